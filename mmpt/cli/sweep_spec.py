"""W&B sweep specs (mmpt/conf/sweep/*.yaml) for `mmpt-train`: load, validate against mmpt/conf/, turn into a Hydra multirun.

A spec is W&B's sweep YAML (method, metric, parameters, command) whose parameters are Hydra override keys
and whose command runs `mmpt-train` with fixed overrides and the agent's `${args_no_hyphens}` (or `${args}`:
mmpt-train accepts `--key=value` too). Everything here works without a W&B server.
"""
from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
ARG_MACROS = ("${args_no_hyphens}", "${args}", "${args_no_boolean_flags}")
PREFIX_MACROS = ("${env}", "${interpreter}")
UNSUPPORTED_MACROS = ("${args_json}", "${args_json_file}", "${program}")
PROGRAM = "mmpt-train"
PARAM_KEYS = {"value", "values", "probabilities", "distribution", "min", "max", "q", "mu", "sigma", "a", "b"}
DISTRIBUTIONS = {
    "constant", "categorical", "categorical_w_probabilities", "int_uniform", "uniform", "q_uniform",
    "log_uniform", "log_uniform_values", "q_log_uniform", "q_log_uniform_values", "inv_log_uniform",
    "inv_log_uniform_values", "normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta",
}
TOP_KEYS = {"method", "metric", "parameters", "command", "program", "name", "description", "project", "entity",
            "early_terminate", "run_cap"}
METRIC_PREFIXES = ("train/", "eval/")  # what mmpt logs to W&B


class SpecError(ValueError):
    """A problem with a sweep spec; the CLI prints `error: <spec>: <message>` and exits 2."""


@dataclass
class Parameter:
    key: str  # a Hydra override key, e.g. optimizer.lr, +loss.weights.mlm
    spec: dict[str, Any]

    @property
    def values(self) -> list[Any] | None:
        """The discrete values (`value` or `values`), None for a distribution."""
        if "values" in self.spec:
            return list(self.spec["values"])
        if "value" in self.spec:
            return [self.spec["value"]]
        return None

    def probe_values(self) -> list[Any]:
        """Values to compose-check: every discrete value, or a distribution's two ends."""
        if self.values is not None:
            return self.values
        lo, hi = self.spec.get("min"), self.spec.get("max")
        dist = str(self.spec.get("distribution", ""))
        if dist in ("log_uniform", "q_log_uniform") and lo is not None and hi is not None:
            return [math.exp(lo), math.exp(hi)]  # min/max are exponents here
        if dist in ("inv_log_uniform",) and lo is not None and hi is not None:
            return [math.exp(-lo), math.exp(-hi)]
        if lo is not None and hi is not None:
            return [lo, hi]
        if "mu" in self.spec:
            return [self.spec["mu"]]
        return [0.5] if dist.endswith("beta") else []


@dataclass
class SweepSpec:
    path: Path
    method: str
    metric: dict[str, Any]
    parameters: list[Parameter]
    fixed: list[str]  # fixed Hydra overrides from the command
    arg_macro: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def swept(self) -> list[Parameter]:
        return [p for p in self.parameters if p.values is None or len(p.values) > 1]

    def grid_size(self) -> int | None:
        sizes = [len(p.values) if p.values is not None else None for p in self.parameters]
        return None if None in sizes else math.prod(sizes)  # type: ignore[arg-type]


def load_spec(path: str | Path) -> SweepSpec:
    """Parse and check the spec's structure (method, metric, parameters, command); SpecError names the part."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        from mmpt.cli.conf_search import conf_dirs

        names = sorted({p.stem for root in conf_dirs() for p in (root / "sweep").glob("*.yaml")})
        raise SpecError(f"no such sweep spec: {path}; give a spec file or the name of one in mmpt/conf/sweep/ or "
                        f"$MMPT_CONF_DIR/sweep/: {', '.join(names)}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SpecError("a sweep spec is a mapping with method, metric, parameters and command")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise SpecError(f"unknown top-level key {unknown[0]!r}; valid keys: {', '.join(sorted(TOP_KEYS))}")
    method = raw.get("method")
    if method not in METHODS:
        raise SpecError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    metric = raw.get("metric")
    if not isinstance(metric, dict) or not metric.get("name"):
        raise SpecError("metric is required: {name: eval/retrieval/mean, goal: maximize}")
    if metric.get("goal", "minimize") not in GOALS:
        raise SpecError(f"metric.goal={metric.get('goal')!r}: choose minimize or maximize")
    if not str(metric["name"]).startswith(METRIC_PREFIXES):
        raise SpecError(f"metric.name={metric['name']!r} is not a key mmpt logs; use train/<loss> or eval/<metric> "
                        "(e.g. eval/retrieval/mean)")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SpecError("parameters must map Hydra override keys to {values: [...]}, {value: ...} or a distribution")
    parameters = [_parameter(str(k), v, method) for k, v in params.items()]
    fixed, macro = _command(raw.get("command"), raw.get("program"))
    spec = SweepSpec(path, method, dict(metric), parameters, fixed, macro, raw)
    fixed_keys = {_override_key(o) for o in fixed}
    for p in parameters:
        if _override_key(p.key) in fixed_keys:
            raise SpecError(f"parameter {p.key!r} is also a fixed override in the command; keep one of them")
    return spec


def _parameter(key: str, spec: Any, method: str) -> Parameter:
    if not isinstance(spec, dict):
        raise SpecError(f"parameter {key!r} must be a mapping: {{values: [...]}}, {{value: x}} or a distribution")
    if "parameters" in spec:
        raise SpecError(f"parameter {key!r}: nested parameters are not supported; name the full key "
                        f"({key}.<child>) as its own parameter")
    unknown = sorted(set(spec) - PARAM_KEYS)
    if unknown:
        raise SpecError(f"parameter {key!r} has unknown field {unknown[0]!r}; valid: {', '.join(sorted(PARAM_KEYS))}")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise SpecError(f"parameter {key!r}: values must be a non-empty list")
    dist = spec.get("distribution")
    if dist is not None and dist not in DISTRIBUTIONS:
        raise SpecError(f"parameter {key!r}: unknown distribution {dist!r}")
    discrete = "value" in spec or "values" in spec
    if not discrete and not ({"min", "max"} <= set(spec) or "mu" in spec or dist in ("beta", "q_beta")):
        raise SpecError(f"parameter {key!r} needs values: [...], value: x, or a distribution with min and max")
    if method == "grid" and not discrete:
        raise SpecError(f"parameter {key!r}: method=grid needs values: [...] (a grid cannot sample "
                        f"{dist or 'a range'}); use method=random or list the values")
    if not re.fullmatch(r"(\+\+|\+)?[A-Za-z_$][\w$-]*([./][\w$-]+)*(@[\w$.-]*)?", key):
        raise SpecError(f"parameter {key!r} is not a Hydra override key (e.g. optimizer.lr, +loss.weights.mlm)")
    return Parameter(key, dict(spec))


def _command(command: Any, program: Any) -> tuple[list[str], str]:
    """The fixed overrides and the agent's args macro of
    `command: [${env}, mmpt-train, k=v, ..., ${args_no_hyphens}]`."""
    example = "[${env}, mmpt-train, experiment=clip_tiny, ${args_no_hyphens}]"
    if program is not None and Path(str(program)).name != PROGRAM:
        raise SpecError(f"program={program!r}: the sweeps here run {PROGRAM} (command: {example})")
    if not isinstance(command, list) or not command:
        raise SpecError(f"command is required: {example}")
    tokens = [str(t) for t in command]
    starts = [i for i, t in enumerate(tokens) if Path(t).name == PROGRAM]
    if not starts:
        raise SpecError(f"command must run {PROGRAM}: {example}")
    head, rest = tokens[: starts[0]], tokens[starts[0] + 1:]
    bad_head = [t for t in head if t not in PREFIX_MACROS]
    if bad_head:
        raise SpecError(f"command: {bad_head[0]!r} before {PROGRAM}; only ${{env}} may come first ({example})")
    macros = [t for t in rest if t in ARG_MACROS]
    if len(macros) != 1:
        raise SpecError(f"command needs exactly one of {', '.join(ARG_MACROS)} (the swept values): {example}")
    fixed = []
    for t in rest:
        if t in ARG_MACROS:
            continue
        if t in UNSUPPORTED_MACROS or t.startswith("${"):
            raise SpecError(f"command: {t} is not supported; pass the values with ${{args_no_hyphens}}")
        if t.startswith("-"):
            raise SpecError(f"command: {t!r} is not a Hydra override (a W&B agent runs one job per run: no -m)")
        if "=" not in t:
            raise SpecError(f"command: {t!r} is not a Hydra override key=value")
        fixed.append(t)
    return fixed, macros[0]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def fixed_overrides(spec: SweepSpec, extra: list[str] | None = None) -> list[str]:
    """The command's fixed overrides with `extra` applied: an extra override of the same key replaces the
    spec's in place, a new one is appended; a swept parameter cannot be overridden (SpecError)."""
    swept = {_override_key(p.key) for p in spec.parameters}
    out = list(spec.fixed)
    for item in extra or []:
        key = _override_key(item)
        if key in swept:
            raise SpecError(f"{item!r}: {key} is a parameter of the sweep; edit its values in the spec instead")
        same = [i for i, o in enumerate(out) if _override_key(o) == key]
        if same:
            out[same[0]] = item
        else:
            out.append(item)
    return out


# ---- values as Hydra override text -------------------------------------------------------------------------
_BARE = re.compile(r"[\w./:@+-]+")


def format_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back as the same value (as a W&B agent would pass it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override(key: str, value: Any) -> str:
    return f"{key}={format_value(value)}"


# ---- checks against mmpt/conf/ ------------------------------------------------------------------------
def check_composes(spec: SweepSpec, conf_dir: Path, extra: list[str] | None = None) -> int:
    """Every value of every parameter, with the command's fixed overrides, composes against mmpt/conf/ and passes
    mmpt's schema and combination checks (no data files needed). Returns the configs checked; SpecError
    names the parameter value or override that fails.

    Fast path: one composition with every parameter at its first value, then each other value applied to it
    as an override (a config group choice such as model=... is composed afresh). On any failure the slow
    path finds the culprit: the fixed overrides alone, then each parameter value in turn, the parameters
    before it at their first value."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mmpt.cli.brace_quoting import quote_brace_override

    fixed = [quote_brace_override(o) for o in fixed_overrides(spec, extra)]  # as mmpt-train reads them
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3",
                                   job_name="mmpt_sweep_check"):
            try:
                return _check_fast(spec, fixed, conf_dir)
            except SpecError:
                _check_slow(spec, fixed)  # raises with the culprit named
                raise
    finally:
        GlobalHydra.instance().clear()


def _compose(overrides: list[str]) -> Any:
    from hydra import compose

    return compose(config_name="train", overrides=overrides)


def _is_group(key: str, conf_dir: Path) -> bool:
    """`model`, `hydra/launcher`, `model@x`: a config group choice rather than a value."""
    from mmpt.cli.conf_search import conf_dirs

    name = key.lstrip("+~").split("@", 1)[0]
    return "/" in name or ("." not in name and any((d / name).is_dir() for d in {conf_dir, *conf_dirs()}))


def _check_fast(spec: SweepSpec, fixed: list[str], conf_dir: Path) -> int:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    firsts = {p.key: p.probe_values()[0] for p in spec.parameters if p.probe_values()}
    try:
        base = _compose([*fixed, *(override(k, v) for k, v in firsts.items())])
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"does not compose: {_first_line(exc)}") from None
    checker = _ConfigChecker()
    checker(base, "the parameters' first values")
    checked = 1
    parser = OverridesParser.create()
    for p in spec.parameters:
        for value in p.probe_values()[1:]:
            what = f"parameter {p.key!r} = {format_value(value)}"
            if _is_group(p.key, conf_dir):
                others = [override(k, v) for k, v in firsts.items() if k != p.key]
                try:
                    cfg = _compose([*fixed, *others, override(p.key, value)])
                except Exception as exc:  # noqa: BLE001
                    raise SpecError(f"{what}: does not compose: {_first_line(exc)}") from None
            else:
                cfg = base.copy()
                key = f"+{p.key}" if p.key.startswith("+") and not p.key.startswith("++") else p.key  # added already
                try:
                    _apply_override(parser.parse_override(override(key, value)), cfg)
                except Exception as exc:  # noqa: BLE001
                    raise SpecError(f"{what}: does not compose: {_first_line(exc)}") from None
            checker(cfg, what)
            checked += 1
    return checked


def _apply_override(parsed: Any, cfg: Any) -> None:
    """A value override (`key=v`, `++key=v`) on a composed config, with Hydra's own semantics."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    ConfigLoaderImpl._apply_overrides_to_config([parsed], cfg)


def _check_slow(spec: SweepSpec, fixed: list[str]) -> None:
    checker = _ConfigChecker()
    probes: list[tuple[str, list[str]]] = [("the command's fixed overrides", [])]
    before: list[str] = []
    for p in spec.parameters:
        values = p.probe_values()
        probes += [(f"parameter {p.key!r} = {format_value(v)}", [*before, override(p.key, v)]) for v in values]
        before += [override(p.key, values[0])] if values else []
    for what, own in probes:
        try:
            cfg = _compose([*fixed, *own])
        except Exception as exc:  # noqa: BLE001 - Hydra's composition errors carry the key
            raise SpecError(f"{what}: does not compose: {_first_line(exc)}") from None
        checker(cfg, what)


class _ConfigChecker:
    """mmpt's own checks that need no data files: schema/types, the model, loss weights, combinations.
    The model is built (on the meta device) once per distinct model config."""

    def __init__(self) -> None:
        self.objectives: dict[str, tuple[str, ...]] = {}

    def __call__(self, cfg: Any, what: str) -> None:
        import torch

        from mmpt.engine.config import ConfigError, check_combinations, resolve, typed_config
        from mmpt.models.registry import build_model

        try:
            typed = typed_config(resolve(cfg.copy()))
            key = repr(typed.model)
            if key not in self.objectives:
                with torch.device("meta"):
                    self.objectives[key] = tuple(build_model(typed.model).objectives)
            check_combinations(typed, 1, True, self.objectives[key])  # world size 1 fails only what fails everywhere
        except ConfigError as exc:
            raise SpecError(f"{what}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - e.g. a model config's own consistency check
            raise SpecError(f"{what}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    from mmpt.cli.hydra_errors import missing_extra

    extra = missing_extra(exc, [])  # e.g. hydra/launcher=slurm without the [slurm] extra
    if extra is not None:
        return extra
    text = str(exc).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines()[:2] if line.strip())


# ---- the offline flow: a Hydra multirun ------------------------------------------------------------------
def hydra_command(spec: SweepSpec, extra: list[str] | None = None) -> list[str]:
    """`mmpt-train -m <fixed, with extra applied> <key=v1,v2,...>`: the grid of every `values` list as Hydra's
    basic sweeper runs it. A parameter with a distribution -> SpecError."""
    sampled = [p for p in spec.parameters if p.values is None]
    if sampled:
        p = sampled[0]
        how = p.spec.get("distribution") or ("min/max" if "min" in p.spec else "a distribution")
        raise SpecError(f"parameter {p.key!r} samples {how}, which a Hydra grid cannot express; list the values "
                        f"to try (values: [...]) or run it as a W&B sweep (mmpt-sweep create) with a W&B server")
    swept = []
    for p in spec.parameters:
        values = p.values or []
        swept.append(f"{p.key}=" + ",".join(format_value(v) for v in values))
    return [PROGRAM, "-m", *fixed_overrides(spec, extra), *swept]


def grid_runs(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the grid (what `hydra_command` runs), in Hydra's order."""
    keys = [p.key for p in spec.parameters]
    return [dict(zip(keys, combo, strict=True)) for combo in product(*[p.values or [] for p in spec.parameters])]


def shell_join(cmd: list[str]) -> str:
    return shlex.join(cmd)
