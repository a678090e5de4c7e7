"""Engine.stats, read by the metrics publisher on another thread while the loop runs."""

from __future__ import annotations

from types import SimpleNamespace

from minicpmv.engine.engine import Engine


class Reads:
    """A stand-in engine that records the order in which ``Engine.stats`` reads its state."""

    def __init__(self):
        self.order: list[str] = []
        self.block_manager = SimpleNamespace(num_blocks=4, num_used_blocks=1, prefix_queries=0, prefix_hits=0)
        self.scheduler = SimpleNamespace(num_preemptions=0)
        self.num_steps = 3

    @property
    def num_running(self) -> int:
        self.order.append("running")
        return 0

    @property
    def num_waiting(self) -> int:
        self.order.append("waiting")
        return 0

    @property
    def num_generated_tokens(self) -> int:
        self.order.append("generated")
        return 7


def test_a_snapshot_reads_the_running_set_before_the_token_count():
    # The loop counts a step's tokens before it drops a cancelled sequence: reading ``running`` first means a
    # snapshot showing it gone already holds all of its tokens (tests/triton: a cancelled stream's count is final
    # once the gauge reads 0; read the other way round, one token arrived in the next snapshot).
    fake = Reads()
    stats = Engine.stats(fake)
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["generated_tokens"] == 7
    assert fake.order.index("running") < fake.order.index("generated")
