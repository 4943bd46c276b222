"""DVC stage `ppo`: RLHF of the SFT policy against the reward model with a KL penalty to the SFT reference, by PPO
(GAE with a value model) or a critic-free estimator (`ppo.advantage_estimator`)."""

from __future__ import annotations

from pipeline.eval.gates import tripped_gates
from pipeline.eval.reports import plot_overoptimization, write_curve
from pipeline.methods.ppo import run_ppo
from pipeline.models.build import save_model
from stages.common import finish, run_main, stage

PATHS = {
    "data_dir": "data/prepared",
    "sft_dir": "models/sft",
    "reward_dir": "models/reward",
    "model_dir": "models/ppo",
    "report": "reports/ppo.json",
    "curve": "reports/plots/ppo.csv",
    "monitor_curve": "reports/plots/ppo_monitor.csv",
    "overoptimization": "reports/ppo_overoptimization.png",
}


def main() -> None:
    with stage("ppo", PATHS, inputs=("data_dir", "sft_dir", "reward_dir")) as ctx:
        args = ctx.args
        out = run_ppo(
            ctx.config, data_dir=args.data_dir, sft_dir=args.sft_dir, reward_dir=args.reward_dir, hooks=ctx.hooks()
        )
        if out is None:  # a DDP rank > 0: rank 0 writes
            return
        save_model(out.model, out.tokenizer, args.model_dir)
        write_curve(out.history, args.curve)
        monitor = out.curves.get("monitor", [])
        write_curve(monitor, args.monitor_curve)
        plot_overoptimization(out.history, args.overoptimization, monitor, tripped_gates(out.metrics))
        ctx.run.log_artifact(args.overoptimization)
        finish(ctx, out, args.report, [args.model_dir])


if __name__ == "__main__":
    run_main(main)
