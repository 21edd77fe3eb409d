"""`mmpt-sweep`: hyper-parameter sweeps of `mmpt-train` from W&B sweep specs (mmpt/conf/sweep/*.yaml).

SPEC is a spec file or the name of one in mmpt/conf/sweep/ or $MMPT_CONF_DIR/sweep/ (e.g. albef_lr_grid).

  mmpt-sweep check SPEC [OVERRIDE ...]            validate: method, metric, and that the command's fixed
                                                  overrides and every parameter value compose against mmpt/conf/
  mmpt-sweep hydra SPEC [OVERRIDE ...] [--run]    offline: the equivalent `mmpt-train -m ...` Hydra multirun
                                                  (printed; run with --run); extra overrides go before the
                                                  swept ones, e.g. hydra/launcher=slurm
  mmpt-sweep create SPEC [--project P] [--entity E]   a W&B sweep (needs a W&B server + API key); prints its id
  mmpt-sweep agent SWEEP_ID [--count N] [--project P] [--entity E]   run the sweep's command for its runs

Without a W&B server: `mmpt-sweep hydra SPEC --run` (W&B logs offline; `wandb sync` them later). docs/SWEEPS.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mmpt.cli.sweep_spec import SpecError, grid_runs, hydra_command, load_spec, shell_join

OFFLINE_MODES = ("offline", "disabled", "dryrun")


def fail(message: str, code: int = 2) -> None:
    """`error: ...` on stderr, exit 2 (as mmpt.cli.common.fail, without importing torch for a usage error)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def check_composes(spec, extra: list[str] | None = None) -> int:
    """sweep_spec.check_composes against mmpt/conf/ and MMPT_CONF_DIR (imports torch and the models: only when
    checking)."""
    from mmpt.cli.common import CONF_DIR
    from mmpt.cli.sweep_spec import check_composes as check

    return check(spec, CONF_DIR, extra)


def _offline_hint(spec: str = "SPEC") -> str:
    return (f"without a W&B server, run the grid as a Hydra multirun logged offline: `mmpt-sweep hydra {spec} --run` "
            "(then `wandb sync <run dir>/wandb/offline-run-*`)")


def resolve_spec(name_or_path: str) -> Path:
    """A path as given when it exists; otherwise a spec of that name in MMPT_CONF_DIR/sweep or mmpt/conf/sweep."""
    from mmpt.cli.conf_search import find_sweep_spec

    path = Path(name_or_path)
    return path if path.exists() else find_sweep_spec(name_or_path) or path


def _spec_or_fail(path: str):
    from mmpt.cli.conf_search import user_conf_dir

    try:
        user_conf_dir()
    except FileNotFoundError as exc:
        fail(str(exc))
    try:
        return load_spec(resolve_spec(path))
    except SpecError as exc:
        fail(f"{path}: {exc}")


def cmd_check(args: argparse.Namespace) -> int:
    spec = _spec_or_fail(args.spec)
    try:
        checked = check_composes(spec, args.overrides)
    except SpecError as exc:
        fail(f"{args.spec}: {exc}")
    size = spec.grid_size()
    runs = f"{size} runs as a grid" if size is not None else "sampled runs (W&B only: a distribution)"
    print(f"ok: {args.spec}: method={spec.method}, metric {spec.metric.get('goal', 'minimize')} "
          f"{spec.metric['name']}, {len(spec.parameters)} parameters ({runs}); {checked} configs checked")
    return 0


def cmd_hydra(args: argparse.Namespace) -> int:
    spec = _spec_or_fail(args.spec)
    try:
        cmd = hydra_command(spec, args.overrides)
    except SpecError as exc:
        fail(f"{args.spec}: {exc}")
    if spec.method != "grid":
        print(f"note: method={spec.method}: the Hydra multirun runs all {len(grid_runs(spec))} combinations of the "
              "values (no sampling, no early termination)", file=sys.stderr)
    print(shell_join(cmd), flush=True)
    if not args.run:
        return 0
    try:
        check_composes(spec, args.overrides)
    except SpecError as exc:
        fail(f"{args.spec}: {exc}")
    exe = shutil.which("mmpt-train") or str(Path(sys.executable).parent / "mmpt-train")
    env = {**os.environ}
    env.setdefault("WANDB_MODE", "offline")
    return subprocess.run([exe, *cmd[1:]], env=env).returncode


def _need_server(what: str, spec: str = "SPEC") -> None:
    """One clear line and exit 2 when W&B is offline or has no API key (never an interactive login prompt)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in OFFLINE_MODES:
        fail(f"{what} needs a W&B server, but WANDB_MODE={mode}; {_offline_hint(spec)}")
    try:
        from wandb.sdk.wandb_login import _login

        logged_in, _ = _login(prompt=False, _silent=True)
    except Exception:  # noqa: BLE001 - a wandb without this helper: let wandb.sweep/agent report it
        logged_in = True
    if not logged_in:
        fail(f"{what} needs a W&B server and an API key, and no API key is configured (`wandb login` or "
             f"WANDB_API_KEY); {_offline_hint(spec)}")


def cmd_create(args: argparse.Namespace) -> int:
    spec = _spec_or_fail(args.spec)
    _need_server("mmpt-sweep create", args.spec)
    try:
        check_composes(spec)
    except SpecError as exc:
        fail(f"{args.spec}: {exc}")
    import wandb

    body = dict(spec.raw)
    body.setdefault("name", Path(args.spec).stem)
    try:
        sweep_id = wandb.sweep(body, project=args.project or body.get("project") or "mmpt", entity=args.entity)
    except Exception as exc:  # noqa: BLE001 - network, auth, or the server's spec validation
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"mmpt-sweep create: W&B could not create the sweep: {reason}; {_offline_hint(args.spec)}")
    print(f"sweep id: {sweep_id}\nrun agents with: mmpt-sweep agent {sweep_id}")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    _need_server("mmpt-sweep agent")
    import wandb

    try:
        wandb.agent(args.sweep_id, entity=args.entity, project=args.project, count=args.count)
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"mmpt-sweep agent: {reason}; {_offline_hint()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmpt-sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate a sweep spec against mmpt/conf/")
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides to compose with (e.g. hydra/launcher=slurm)")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("hydra", help="the equivalent Hydra multirun (offline flow)")
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. hydra/launcher=slurm")
    p.add_argument("--run", action="store_true", help="run it (W&B offline unless WANDB_MODE says otherwise)")
    p.set_defaults(fn=cmd_hydra)
    p = sub.add_parser("create", help="create a W&B sweep (needs a W&B server)")
    p.add_argument("spec")
    p.add_argument("--project")
    p.add_argument("--entity")
    p.set_defaults(fn=cmd_create)
    p = sub.add_parser("agent", help="run a W&B sweep agent (needs a W&B server)")
    p.add_argument("sweep_id", help="SWEEP_ID or ENTITY/PROJECT/SWEEP_ID")
    p.add_argument("--count", type=int, help="runs to do before stopping")
    p.add_argument("--project")
    p.add_argument("--entity")
    p.set_defaults(fn=cmd_agent)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.fn(args))


if __name__ == "__main__":
    main()
