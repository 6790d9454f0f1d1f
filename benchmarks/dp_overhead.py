"""DP-SGD overhead: time per training step with DP vs without, per fine-tune policy.

Same model, same batches, same process: for every policy the trainable part is fed
what it sees in training (the frozen part's cached output, or raw images for
``full``), and non-private and private steps are interleaved so that machine noise
hits both alike. The private step uses the mode ``dp-mode = auto`` picks (and, for
comparison, Opacus' hooks and functorch modes). Reports the median ms per step.

    python benchmarks/dp_overhead.py [--policies head,last-1,last-2,full] [--steps 20]
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import config, parser, result, setup_logging
from torch import nn

from fedlens.shared.privacy import DPSGD, resolve_dp_mode
from fedlens.shared.privacy.dpsgd import PlainStepper
from fedlens.shared.task import Task


def _make_dp(task: Task, mode: str):
    params = [p for p in task.head.parameters() if p.requires_grad]
    dp = DPSGD(
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.01, expected_batch_size=task.cfg.batch_size, mode=mode, secure_rng=False
    )
    return dp.stepper(task.head, task.make_optimizer(params, 1e-3), torch.Generator(device=task.device).manual_seed(0))


def _time_policy(cfg, policy: str, steps: int) -> dict[str, object]:
    """Median ms/step: for each DP mode, interleaved with non-private steps on the same batch."""
    task = Task(cfg.__class__.from_mapping({"policy": policy}, base=cfg), num_classes=10)
    batch = cfg.batch_size
    images = torch.randint(0, 255, (batch, 1, 28, 28), dtype=torch.uint8)
    x = task.transform(images).to(task.device)
    if task.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        x = task.model.forward_until(x, task.cut)  # the cached features (x itself for `full`)
    y = torch.randint(0, 10, (batch,), device=task.device)
    auto = resolve_dp_mode(task.head, "auto")
    modes = [auto] + [m for m in ("hooks", "functorch") if m != auto and (policy in ("head", "last-1") or m == "hooks")]
    params = [p for p in task.head.parameters() if p.requires_grad]
    plain = PlainStepper(task.make_optimizer(params, 1e-3))
    task.head.train()
    out: dict[str, object] = {"auto_mode": auto}

    def timed(stepper) -> float:
        t = time.perf_counter()
        stepper.step(nn.functional.cross_entropy(task.head(x), y, reduction="none"))
        if task.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for mode in modes:
        private = _make_dp(task, mode)
        plain_t, dp_t = [], []
        try:
            for i in range(steps + 2):  # two warm-up pairs
                with private.suspended():  # the non-private step runs without DP hooks
                    a = timed(plain)
                b = timed(private)
                if i >= 2:
                    plain_t.append(a)
                    dp_t.append(b)
        finally:
            private.close()
        out[mode] = (1000 * statistics.median(plain_t), 1000 * statistics.median(dp_t))
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--policies", default="head,last-1,last-2,full")
    p.add_argument("--steps", type=int, default=20, help="timed steps per method (heavy policies use a quarter)")
    args = p.parse_args()
    setup_logging()
    cfg = config(args, device="cpu")
    values: dict[str, object] = {}
    print(f"{'policy':<8} {'DP mode':<13} {'no-DP ms':>9} {'DP ms':>9} {'ratio':>9}")
    for policy in args.policies.split(","):
        steps = args.steps if policy in ("head", "last-1") else max(3, args.steps // 4)
        timings = _time_policy(cfg, policy, steps)
        auto = timings.pop("auto_mode")
        for mode, (plain_ms, dp_ms) in timings.items():  # type: ignore[misc]
            tag = f"{mode}*" if mode == auto else mode
            print(f"{policy:<8} {tag:<13} {plain_ms:>9.2f} {dp_ms:>9.2f} {dp_ms / plain_ms:>8.2f}x")
        key = policy.replace("-", "")
        plain_ms, dp_ms = timings[auto]  # type: ignore[misc]
        values[f"{key}_ratio"] = dp_ms / plain_ms
        values[f"{key}_mode"] = auto
    print("* = the mode dp-mode = auto picks")
    result(**values, default_policy=cfg.policy, image_size=cfg.image_size, batch_size=cfg.batch_size, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
