"""Seam: SGLang's CLI. Adds the --safety-* flags and validates them at startup.

AFTER hooks on ServerArgs.add_cli_args (declare) and ServerArgs.from_cli_args (copy onto
the args record as `_tokenwise_safety`, a plain dict that pickles to every child).
A bad flag or probe stops startup with one line saying what and how to fix it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from tokenwise_safety.config import (DEFAULT_PIVOT, MODES, ON_ERROR, PLUGINS, TRACE_DETAILS, ConfigError,
                                     SafetyConfig)
from tokenwise_safety import admission, self_judge
from tokenwise_safety.policy import OVERRIDE_KEY_ENV
from tokenwise_safety.scoring import parse_token_ids
from tokenwise_safety.probe import HarmProbe, ProbeError, ProbeMeta, model_fingerprint, sha256_file

ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"
ATTR = "_tokenwise_safety"


def add_cli_args(result, parser: argparse.ArgumentParser, *args, **kwargs):
    if any("--safety-plugin" in a.option_strings for a in parser._actions):
        return result  # the plugin may be loaded twice in one process
    group = parser.add_argument_group("tokenwise safety plugin")
    group.add_argument("--safety-plugin", choices=PLUGINS, default=None,
                       help="Enable the token-wise harm probe on every decoding step.")
    group.add_argument("--safety-probe", default=None,
                       help="Probe artifact (.json beside .safetensors). Default: the probe "
                            "shipped for the bundled Gemma 3 270M.")
    group.add_argument("--safety-mode", choices=MODES, default="shadow",
                       help="shadow: score and report, never change a token. enforce: veto tokens "
                            "scored over the threshold and re-draw them (or steer in the pivot).")
    group.add_argument("--safety-threshold", type=float, default=None,
                       help="P(harmful) at or above which a token counts as harmful "
                            "(default: the probe's calibrated threshold).")
    group.add_argument("--safety-window", type=int, default=None,
                       help="Positions that must all score at or over the threshold before one is "
                            "judged harmful (1: every token alone; default: the probe's calibrated window).")
    group.add_argument("--safety-top-k", type=int, default=20,
                       help="Candidates of the parent distribution kept for a re-draw; when all "
                            "are vetoed the pivot is used.")
    group.add_argument("--safety-max-vetoes", type=int, default=3,
                       help="Vetoes at one position before the pivot is steered in.")
    group.add_argument("--safety-pivot", default=DEFAULT_PIVOT,
                       help="Safe redirect forced into the answer when no safe candidate remains "
                            "or the prompt itself scores over the threshold; the model continues it.")
    group.add_argument("--safety-client-override", action="store_true",
                       help=f"Let requests loosen the policy when they present the key in ${OVERRIDE_KEY_ENV}.")
    group.add_argument("--safety-keep-overlap-schedule", action="store_true",
                       help="Shadow only: keep SGLang's overlap scheduler (requests then cannot "
                            "ask for enforce). By default the plugin disables it.")
    group.add_argument("--safety-scorer", default="probe",
                       help="'probe' (default) or 'token-ids:ID,...' (flags those token ids; for "
                            "testing the commit mechanism).")
    group.add_argument("--safety-on-error", choices=ON_ERROR, default="fail-closed",
                       help="When scoring or enforcement fails for a step (an exception, a NaN or inf "
                            "score, no hidden state): fail-closed ends the affected requests with a "
                            "clear finish reason; fail-open lets them continue unscored. The server "
                            "keeps serving either way, and a counter rises.")
    group.add_argument("--safety-trace-detail", choices=TRACE_DETAILS, default="decisions",
                       help="What the harm trace shows a request that does not present the operator "
                            "key: full (per-token scores and the vetoed token ids), scores (per-token "
                            "scores, no vetoed ids), decisions (interventions' positions and counts only).")
    group.add_argument("--safety-draft-probe", default=None,
                       help="Harmless-first drafting (STANDALONE speculative decoding with draft trees): a "
                            "probe calibrated on the draft model; below a draft it judges harmful for an "
                            "enforced request, the tree's branches are ranked down in favour of its siblings.")
    group.add_argument("--safety-draft-threshold", type=float, default=None,
                       help="The draft probe's threshold (default: its calibrated one).")
    _add_judge_args(parser.add_argument_group("tokenwise safety: self-judgment"))
    return result


def _add_judge_args(group) -> None:
    group.add_argument("--safety-self-judge", choices=self_judge.MODES, default="off",
                       help="on: when an enforced request's probe score lies in the uncertain band, ask "
                            "the served model whether its partial answer is harmful (a fork of the "
                            "request's KV: only the judge suffix is computed) and let the verdict decide. "
                            "shadow: judge and record in the trace, decide by the probe alone.")
    group.add_argument("--safety-judge-band", default=None, metavar="LOW,HIGH",
                       help="Probe scores (P(harmful)) the verdict decides for (default: from the probe's "
                            "calibration record, the lowest to the highest of its leave-one-source-out "
                            "thresholds and the served threshold; "
                            f"{self_judge.JudgeConfig.low},{self_judge.JudgeConfig.high} for a probe without one).")
    group.add_argument("--safety-judge-every", type=int, default=self_judge.JudgeConfig.every,
                       help="Output positions a verdict stands for: at most one judge pass per request "
                            "per this many tokens.")
    group.add_argument("--safety-judge-threshold", type=float, default=self_judge.JudgeConfig.verdict_threshold,
                       help="P(yes) / (P(yes) + P(no)) at or above which the verdict is 'harmful'.")
    group.add_argument("--safety-judge-question", default=self_judge.DEFAULT_QUESTION,
                       help="The question put to the model after its partial answer, in its chat template.")


def from_cli_args(server_args, cls, args: argparse.Namespace, *a, **kw):
    if getattr(args, "safety_plugin", None) is None:
        return server_args
    try:
        config = validate(args, server_args.model_path)
    except (ConfigError, ProbeError) as e:
        print(f"tokenwise-safety: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    # Decided before the plugin turns capture on for itself (below): only an operator who
    # enabled hidden states lets clients have them (patches/meta_info.py refuses the rest).
    config["client_hidden_states"] = bool(server_args.enable_return_hidden_states
                                          or server_args.return_hidden_states_mode is not None)
    setattr(server_args, ATTR, config)
    admission.ensure_secret()  # before SGLang starts its children, which inherit it
    if not config["keep_overlap"]:
        # Enforcement rolls back a vetoed token before the next step is prepared, which
        # the overlap scheduler (step k+1 launched before step k is processed) forbids.
        server_args.disable_overlap_schedule = True
    # A probe on the final layer reads each request's last-position final hidden state,
    # which SGLang only keeps when capture mode is at least LAST (clients still cannot ask
    # for it, see above). Other layers are tapped (patches/layer_capture.py).
    if -1 in config["layers"] and server_args.return_hidden_states_mode is None \
            and not server_args.enable_return_hidden_states:
        server_args.return_hidden_states_mode = "last"
    return server_args


def validate(args: argparse.Namespace, model_path: str) -> dict:
    """Check flags and probe against the served model; returns the config for children."""
    probe_path = Path(args.safety_probe) if args.safety_probe else _default_probe(model_path)
    cfg = SafetyConfig(probe_path=probe_path, mode=args.safety_mode, threshold=args.safety_threshold,
                       top_k=args.safety_top_k, max_vetoes=args.safety_max_vetoes, pivot=args.safety_pivot,
                       keep_overlap=args.safety_keep_overlap_schedule, window=args.safety_window,
                       client_override=args.safety_client_override, scorer=args.safety_scorer,
                       on_error=args.safety_on_error, trace_detail=args.safety_trace_detail)
    if cfg.client_override and not os.environ.get(OVERRIDE_KEY_ENV):
        raise ConfigError(f"--safety-client-override needs the key in the environment: "
                          f"export {OVERRIDE_KEY_ENV}=<secret>")
    _check_speculative(args)
    _check_serving_path(args, cfg)
    if cfg.scorer != "probe":
        try:
            parse_token_ids(cfg.scorer)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    probe = HarmProbe.load(cfg.probe_path)
    judge = _judge_config(args, cfg, model_path, probe.meta)
    model_cfg = _read_model_config(model_path)
    if model_cfg is None:
        print(f"tokenwise-safety: note: {model_path} is not a local model folder; the probe's hidden-size "
              "and model-fingerprint checks run when the weights load", file=sys.stderr)
    else:
        check_probe_fits(probe, cfg.probe_path, model_cfg, model_path)
    # The token-ids scorer reads no hidden state and flags single tokens: window 1.
    probe_scorer = cfg.scorer == "probe"
    layers = _served_layers(probe, model_cfg, cfg.probe_path) if probe_scorer else []
    return {"probe_path": str(cfg.probe_path), "probe_sha256": sha256_file(cfg.probe_path),
            "tensors_sha256": probe.meta.tensors_sha256, "mode": cfg.mode, "layers": layers,
            "window": cfg.window or (probe.meta.window if probe_scorer else 1),
            "threshold": cfg.threshold if cfg.threshold is not None else probe.threshold,
            "top_k": cfg.top_k, "max_vetoes": cfg.max_vetoes, "pivot": cfg.pivot,
            "keep_overlap": cfg.keep_overlap, "enforce_possible": not cfg.keep_overlap,
            "client_override": cfg.client_override, "scorer": cfg.scorer,
            "on_error": cfg.on_error, "trace_detail": cfg.trace_detail, "judge": judge,
            "draft": _draft_config(args, cfg)}


def _draft_config(args: argparse.Namespace, cfg: SafetyConfig) -> dict | None:
    """The draft model's probe for harmless-first drafting (None: off), checked against the
    draft model (STANDALONE, draft trees, an eager draft loop)."""
    path = getattr(args, "safety_draft_probe", None)
    if path is None:
        if getattr(args, "safety_draft_threshold", None) is not None:
            raise ConfigError("--safety-draft-threshold needs --safety-draft-probe")
        return None
    if str(getattr(args, "speculative_algorithm", None)).upper() != "STANDALONE":
        raise ConfigError("--safety-draft-probe needs --speculative-algorithm STANDALONE (a draft model "
                          "to put the probe on)")
    if (getattr(args, "speculative_eagle_topk", None) or 1) < 2:
        raise ConfigError("--safety-draft-probe ranks the branches of draft trees: add --speculative-eagle-topk 2 "
                          "(or more); a chain has no harmless sibling to continue from")
    if _device(args) != "cpu" and not getattr(args, "disable_cuda_graph", False):
        raise ConfigError("--safety-draft-probe needs the eager draft loop: add --disable-cuda-graph")
    probe = HarmProbe.load(Path(path))
    draft_model = args.speculative_draft_model_path
    model_cfg = _read_model_config(draft_model) if draft_model else None
    if model_cfg is not None:
        check_probe_fits(probe, path, model_cfg, draft_model)
    probe_scorer = cfg.scorer == "probe"
    return {"probe_path": str(Path(path)), "tensors_sha256": probe.meta.tensors_sha256,
            "layers": _served_layers(probe, model_cfg, path) if probe_scorer else [],
            "window": probe.meta.window if probe_scorer else 1,
            "threshold": args.safety_draft_threshold if args.safety_draft_threshold is not None
            else probe.threshold}


def _judge_config(args: argparse.Namespace, cfg: SafetyConfig, model_path: str, meta: ProbeMeta) -> dict:
    """The self-judgment settings, checked against the launch and the served tokenizer."""
    mode = getattr(args, "safety_self_judge", "off")
    band = getattr(args, "safety_judge_band", None)
    try:
        low, high = (float(x) for x in band.split(",")) if band else _default_band(cfg, mode, meta)
    except ValueError:
        raise ConfigError(f"--safety-judge-band {band!r}: use LOW,HIGH (two numbers)") from None
    try:
        jc = self_judge.JudgeConfig(mode=mode, low=low, high=high, every=args.safety_judge_every,
                                    verdict_threshold=args.safety_judge_threshold,
                                    question=args.safety_judge_question)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if mode != "off":
        if cfg.keep_overlap:
            raise ConfigError("--safety-self-judge needs enforce, which --safety-keep-overlap-schedule rules out")
        if getattr(args, "speculative_algorithm", None) is not None:
            raise ConfigError("--safety-self-judge is not supported with --speculative-algorithm yet: "
                              "launch with one or the other")
        _check_judge_tokenizer(model_path, jc)
    return dataclasses.asdict(jc)


def _default_band(cfg: SafetyConfig, mode: str, meta: ProbeMeta) -> tuple[float, float]:
    """The served probe's calibration band (self_judge.calibration_band), else the fixed one
    (judging off, a token-id scorer, a probe whose record has no leave-one-source-out folds)."""
    fixed = (self_judge.JudgeConfig.low, self_judge.JudgeConfig.high)
    if mode == "off" or cfg.scorer != "probe":
        return fixed
    threshold = cfg.threshold if cfg.threshold is not None else meta.threshold
    return self_judge.calibration_band(meta.metrics, threshold) or fixed


def _check_judge_tokenizer(model_path: str, jc) -> None:
    """The served tokenizer must spell the suffix and tell yes from no (a local model folder
    is checked here; a hub id when the scheduler builds the judge)."""
    if not (Path(model_path) / "config.json").is_file():
        return
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    try:
        self_judge.verdict_ids(tok)
    except self_judge.JudgeSetupError as e:
        raise ConfigError(str(e)) from None
    if not self_judge.suffix_ids(tok, jc.question):
        raise ConfigError("--safety-judge-question gives an empty judge suffix for this model")


# Ingresses that hand tokenized requests to the scheduler without SGLang's TokenizerManager,
# where the plugin checks each request's policy and shapes its trace.
UNGUARDED_INGRESS = (("smg_grpc_mode", "--smg-grpc-mode"), ("grpc_mode", "--grpc-mode"),
                     ("grpc_port", "--grpc-port"), ("sidecar", "--sidecar"))
# Grammar backends whose matchers can roll a token back (a veto takes the pending token back).
ROLLBACK_GRAMMARS = (None, "xgrammar", "llguidance", "none")


# Speculative algorithms whose verify goes through eagle_sample with the target's tree,
# where patches/spec_verify.py scores and vetoes the drafts (tested on CPU: NGRAM, STANDALONE).
SPECULATIVE = ("NGRAM", "STANDALONE")


def _check_speculative(args: argparse.Namespace) -> None:
    algorithm = getattr(args, "speculative_algorithm", None)
    if algorithm is None:
        return
    if str(algorithm).upper() not in SPECULATIVE:
        raise ConfigError(f"--speculative-algorithm {algorithm} is not supported with --safety-plugin "
                          f"(supported: {', '.join(SPECULATIVE)})")
    if getattr(args, "speculative_use_rejection_sampling", False):
        raise ConfigError("--speculative-use-rejection-sampling is not supported with --safety-plugin: "
                          "its verify reads draft probabilities the veto does not mask")


def _device(args: argparse.Namespace) -> str:
    """The device SGLang will serve on (it picks CUDA when --device is not given and one is present)."""
    if getattr(args, "device", None):
        return args.device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_serving_path(args: argparse.Namespace, cfg: SafetyConfig) -> None:
    """Refuse launch options the plugin cannot guard or enforce under, one line each."""
    for attr, flag in UNGUARDED_INGRESS:
        if getattr(args, attr, None) not in (None, False):
            raise ConfigError(f"{flag} serves requests that bypass the plugin's policy check; "
                              "serve over HTTP (drop the flag) or launch without --safety-plugin")
    if os.environ.get("SGLANG_RUST_SERVER"):
        raise ConfigError("SGLANG_RUST_SERVER serves requests that bypass the plugin's policy check; "
                          "unset it or launch without --safety-plugin")
    if cfg.keep_overlap:
        return  # shadow only: nothing is vetoed, rolled back or pivoted
    backend = getattr(args, "grammar_backend", None)
    if backend not in ROLLBACK_GRAMMARS:
        raise ConfigError(f"--grammar-backend {backend} cannot roll a vetoed token back; use xgrammar "
                          "or llguidance, or add --safety-keep-overlap-schedule (shadow only)")
    if getattr(args, "skip_tokenizer_init", False):
        raise ConfigError("--skip-tokenizer-init leaves the scheduler without the tokenizer the safe "
                          "pivot needs; drop it, or add --safety-keep-overlap-schedule (shadow only)")


def check_probe_fits(probe: HarmProbe, probe_path, model_cfg: dict, model_name) -> None:
    """The probe was calibrated on this model: same hidden size, same fingerprint."""
    hidden = model_cfg.get("text_config", model_cfg).get("hidden_size")
    if hidden != probe.meta.hidden_size:
        raise ProbeError(f"probe {probe_path} is for hidden size {probe.meta.hidden_size}, "
                         f"model {model_name} has {hidden}: calibrate a probe for this model "
                         "(python -m tokenwise_safety.calibrate --model ...)")
    fp = model_fingerprint(model_cfg)
    if fp != probe.meta.model_fingerprint:
        raise ProbeError(f"probe {probe_path} was calibrated on model {probe.meta.model_fingerprint}, "
                         f"served model is {fp}: calibrate a probe for this model "
                         "(python -m tokenwise_safety.calibrate --model ...)")


def _served_layers(probe: HarmProbe, model_cfg: dict | None, probe_path) -> list[int]:
    """The probe's layers with the final one spelled -1 (what the server reads it as)."""
    n = (model_cfg or {}).get("text_config", model_cfg or {}).get("num_hidden_layers")
    layers = [-1 if (i == -1 or i == n) else i for i in probe.meta.layers]
    bad = [i for i in layers if i != -1 and (i < 1 or (n is not None and i >= n))]
    if bad:
        raise ProbeError(f"probe {probe_path} reads layers {bad}, outside 1..{n} of the served model "
                         "(hidden_states indices; -1 = final)")
    return layers


def _default_probe(model_path: str) -> Path:
    """The probe shipped for the served model when it is a bundled model's prepared folder;
    otherwise the embedded default's (a model it does not fit is refused with advice)."""
    from tokenwise_safety import bundled
    served = Path(model_path).resolve()
    for name in bundled.MODELS:
        probe = bundled.probe_path(name)
        if probe is not None and served == bundled.model_dir(name).resolve():
            return probe
    return bundled.PROBE_PATH


def _read_model_config(model_path: str) -> dict | None:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None  # a hub id: SGLang resolves it later; the probe is checked on hidden size at load
    return json.loads(path.read_text())
