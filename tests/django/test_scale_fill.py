"""The Django filler of ``bench_scale`` (issue 21, item 3) makes entries the store can find
and prune as if it had journaled them itself: lookups by run id go through ``run_digest``,
and the expired entries it adds have expired (else the prune figure times nothing)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.scale_targets import DjangoTarget


def test_filled_entries_are_found_by_key_and_by_their_own_run_id(
    sqlite_alias: str, tmp_path: Path
) -> None:
    target = DjangoTarget(tmp_path)
    target.fill(30)
    for i in (0, 1, 17, 29):
        by_run = target.store.journal_get(target.run_id(i))
        assert by_run is not None, target.run_id(i)
        assert (by_run.key, by_run.run_id) == (target.key(i), target.run_id(i))
        [listed] = target.store.journal_list(run_id=target.run_id(i))
        assert listed.key == target.key(i)
    assert target.store.journal_get(target.run_id(30)) is None


def test_expired_entries_added_for_the_prune_figure_are_pruned(
    sqlite_alias: str, tmp_path: Path
) -> None:
    target = DjangoTarget(tmp_path)
    target.fill(10)
    kept = {e.key for e in target.store.journal_list(limit=100)}
    target.add_expired(25)
    # Each expired entry comes with its done claim and handler record, as a delivery's.
    assert target.store.purge() == 3 * 25
    assert {e.key for e in target.store.journal_list(limit=100)} == kept
