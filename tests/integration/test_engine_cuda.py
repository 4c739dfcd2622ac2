"""The engine on CUDA (Triton attention, CUDA graphs, overlapped steps) against
transformers: greedy tokens and label scores. Skipped without a CUDA device; these are the
engine-level checks a GPU session runs (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from checkpoints import hf_greedy, load_hf

from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.engine import collect

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MAX_NEW = 12
LABELS = (89, 78)


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 256, (30,), generator=g).tolist()
    tails = [torch.randint(3, 256, (1 + i % 25,), generator=g).tolist() for i in range(n)]
    return [prefix + t if i % 3 else t for i, t in enumerate(tails)]


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_greedy_generation_on_cuda_matches_transformers(qwen3_dir: Path, cuda_graphs: bool) -> None:
    prompts = _prompts(32)
    config = EngineConfig(
        model=str(qwen3_dir),
        device="cuda",
        dtype="float32",
        kv_tokens=600,  # small: chunking, eviction and preemption happen
        chunked_prefill_size=16,
        max_batch_tokens=96,
        max_running_requests=32,
        cuda_graphs=cuda_graphs,
    )

    async def run() -> tuple[list[list[int]], int]:
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
        async with Engine(config) as engine:
            assert engine.backend.decoder.attention == "triton"
            results = await asyncio.gather(*(collect(engine.submit(p, params)) for p in prompts))
            engine.core.check_integrity()
            assert engine.core.cache.protected_size == 0
            graphs = engine.runner.graphs
            assert (graphs is not None) == cuda_graphs
            return [r.token_ids for r in results], graphs.replays if graphs else 0

    got, replays = asyncio.run(run())
    want = hf_greedy(qwen3_dir, prompts, MAX_NEW)
    if cuda_graphs:
        assert replays > 0, "decode steps were meant to replay captured graphs"
    # cuBLAS and CPU float32 round differently; a near-tie may flip a later token, never the
    # first (prefill) one, and only rarely a whole sequence.
    assert [g[0] for g in got] == [w[0] for w in want]
    same = sum(g == w for g, w in zip(got, want))
    assert same >= len(prompts) - 2, [(g, w) for g, w in zip(got, want) if g != w][:3]


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_scores_on_cuda_with_overlap_match_transformers(
    qwen3_dir: Path, dtype: str, tolerance: float
) -> None:
    queries = [[70 + i, 71, 72, 73] * 8 for i in range(4)]
    items = [[80 + j] * (3 + 7 * j) for j in range(6)]
    config = EngineConfig(
        model=str(qwen3_dir),
        device="cuda",
        dtype=dtype,
        kv_tokens=4096,
        chunked_prefill_size=64,
        max_batch_tokens=128,
        overlap="auto",
    )

    async def run() -> tuple[list[list[list[float]]], int]:
        async with Engine(config) as engine:
            assert engine.overlaps
            results = await asyncio.gather(
                *(engine.score(q, items, label_token_ids=LABELS) for q in queries)
            )
            engine.core.check_integrity()
            return [r.scores for r in results], engine.times.overlapped

    scores, overlapped = asyncio.run(run())
    assert overlapped > 0
    model = load_hf(qwen3_dir)
    with torch.inference_mode():
        for q, got in zip(queries, scores):
            for item, row in zip(items, got):
                logits = model(torch.tensor([q + item])).logits[0, -1, list(LABELS)]
                want = torch.softmax(logits.float(), -1).tolist()
                assert row == pytest.approx(want, abs=tolerance)


def test_a_scoring_step_launches_without_waiting_for_the_device(qwen3_dir: Path) -> None:
    """What overlapped steps rest on: ``ModelRunner.launch`` of a scoring step returns while
    the device is still busy with earlier work (no hidden synchronisation), and ``collect``
    then brings its scores back."""
    from slmserve.cache.kv_pool import KVPool
    from slmserve.engine.core import CoreLimits, EngineCore
    from slmserve.engine.runner import ModelRunner, StepTimes
    from slmserve.engine.sequence import Sequence
    from slmserve.models.loader import load_model
    from slmserve.schedulers.fcfs import FCFS

    backend = load_model(qwen3_dir, device="cuda", dtype="bfloat16")
    kv = KVPool(backend.info.kv_layout, 2048, dtype=torch.bfloat16, device="cuda")
    core = EngineCore(kv.allocator, FCFS(), CoreLimits(512, 512, 64, 2048))
    runner = ModelRunner(backend, kv, StepTimes())

    def step(first_id: int) -> tuple[object, object]:
        for i in range(4):
            seq = Sequence(
                f"r{first_id + i}",
                [70 + i] * 20 + [80 + first_id] * 10,
                SamplingParams(max_tokens=1),
                arrival_time=0.0,
                client_id="c",
                eos_ids=frozenset(),
                label_ids=LABELS,
            )
            core.add(seq, 0.0)
        plan = core.plan_step(0.0)
        assert len(plan.items) == 4 and plan.closed
        return plan, runner.launch(plan)

    plan, launched = step(0)  # the first launch compiles kernels and pins the host buffer
    core.complete_step(plan, runner.collect(launched).sampled)
    for item in plan.items:
        core.finish(item.seq, "stop")
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of device time ahead of the step
    busy = torch.cuda.Event()
    busy.record()
    plan, launched = step(100)
    assert not busy.query(), "launch waited for the device"
    result = runner.collect(launched)
    assert busy.query()
    assert sorted(result.scores) == [f"r{100 + i}" for i in range(4)]
    assert all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in result.scores.values())


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_generation_steps_launch_ahead_without_waiting_for_the_device(
    qwen3_dir: Path, cuda_graphs: bool
) -> None:
    """What overlapped generation rests on: a prefill-and-sample step and the decode step
    planned after it (its input token still on the device) both launch while the device is
    busy with earlier work, and give the tokens of steps run one at a time."""
    from slmserve.cache.kv_pool import KVPool
    from slmserve.engine.core import CoreLimits, EngineCore
    from slmserve.engine.runner import ModelRunner, StepTimes
    from slmserve.engine.sequence import Sequence
    from slmserve.models.loader import load_model
    from slmserve.schedulers.fcfs import FCFS

    backend = load_model(qwen3_dir, device="cuda", dtype="float32")
    kinds = [  # every per-row tensor the sampler builds, and prompt logprobs
        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, top_k=20, min_p=0.01, seed=3,
                       logprobs=2),
        SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.3,
                       frequency_penalty=0.2, prompt_logprobs=1),
    ]  # fmt: skip

    def run(ahead: bool) -> list[list[int]]:
        kv = KVPool(backend.info.kv_layout, 2048, dtype=torch.float32, device="cuda")
        core = EngineCore(kv.allocator, FCFS(), CoreLimits(512, 512, 64, 2048))
        runner = ModelRunner(backend, kv, StepTimes(), cuda_graphs=cuda_graphs, max_batch=16)
        seqs = [
            Sequence(f"g{i}", [40 + i] * (5 + i), kinds[i % 3], arrival_time=0.0,
                     client_id="c", eos_ids=frozenset())
            for i in range(6)
        ]  # fmt: skip
        for seq in seqs:
            core.add(seq, 0.0)
        inflight = []
        while core.has_work() or inflight:
            if not inflight or (ahead and len(inflight) < 2):
                plan = core.plan_step(0.0)
                if plan.items:
                    torch.cuda.synchronize()
                    torch.cuda._sleep(200_000_000)  # device time ahead of the launch
                    busy = torch.cuda.Event()
                    busy.record()
                    inflight.append((plan, runner.launch(plan)))
                    assert not busy.query(), "launch waited for the device"
                    continue
            plan, launched = inflight.pop(0)
            core.complete_step(plan, runner.collect(launched).sampled)
            for item in plan.items:
                seq = item.seq
                if item.sample and seq in core.running.values() and core.stop_reason(seq):
                    core.finish(seq, "length")
        core.check_integrity()
        return [seq.output_ids for seq in seqs]

    assert run(ahead=True) == run(ahead=False)
