"""`python -m launcher [overrides]`: compose the config, validate it, then plan or train."""
from __future__ import annotations

import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from launcher.config import ConfigError, register_schema, to_job_config

register_schema()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        job = to_job_config(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if job.run_dir != ".":
        # Hydra has already made its own run dir (and written .hydra/ there); a second name would split
        # the run in two, and a resume would look in the wrong place.
        print(f"error: run_dir={job.run_dir!r}: the run dir is Hydra's; choose it with hydra.run.dir={job.run_dir} "
              "(the same value again continues that run from its last checkpoint)", file=sys.stderr)
        sys.exit(2)
    job.run_dir = HydraConfig.get().runtime.output_dir
    if job.launcher.mode == "plan":
        from launcher.plan import print_plan

        if print_plan(job):
            sys.exit(1)
        return
    from launcher.driver import RayConnectError, WorkerError, run_training
    from launcher.preflight import ResourceError
    from launcher.topology import TopologyError

    # Ctrl-C must stop the run even when this process started with SIGINT ignored or blocked (a
    # script's background job, or a parent that blocked it): Python then raises no KeyboardInterrupt
    # and training would go on. SIGTERM is Ray's: its driver handler exits through the same cleanup.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        summary = run_training(job)
    except (RayConnectError, ResourceError, TopologyError, WorkerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: workers stopped", file=sys.stderr)
        sys.exit(130)
    print(f"done: {summary['steps']} steps, loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
          + (f", eval loss {summary['eval_loss']:.4f}" if summary.get("eval_loss") is not None else "")
          + f", {summary['tokens_per_s']:.0f} tokens/s"
          + (f", {summary['restarts']} restart(s) after worker failures" if summary.get("restarts") else "")
          + f"; run dir {job.run_dir}")


if __name__ == "__main__":
    main()
