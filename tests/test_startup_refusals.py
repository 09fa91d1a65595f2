"""Launch options the plugin cannot guard or enforce under are refused with one line, before
any model is loaded (same harness as test_startup_errors.py)."""
import pytest

from test_startup_errors import assert_refused, launch, weightless_model  # noqa: F401 (fixture)

PLUGIN = ("--safety-plugin", "tokenwise")


@pytest.mark.parametrize("flags, message", [
    (["--grpc-mode"], "--grpc-mode serves requests that bypass the plugin's policy check"),
    (["--smg-grpc-mode"], "--smg-grpc-mode serves requests that bypass the plugin's policy check"),
    (["--grpc-port", "50051"], "--grpc-port serves requests that bypass the plugin's policy check"),
    (["--grammar-backend", "outlines"], "--grammar-backend outlines cannot roll a vetoed token back"),
    (["--skip-tokenizer-init"], "--skip-tokenizer-init leaves the scheduler without the tokenizer"),
    (["--safety-scorer", "token-ids:5,x"], "token ids must be integers"),
    (["--safety-scorer", "token-ids:5+boom:3"], "use 'token-ids:ID,...' optionally followed by"),
    (["--safety-self-judge", "on", "--safety-judge-band", "0.9,0.2"], "--safety-judge-band 0.9,0.2: need 0 <= LOW"),
    (["--safety-self-judge", "on", "--speculative-algorithm", "NGRAM"],
     "--safety-self-judge is not supported with --speculative-algorithm"),
    (["--safety-draft-probe", "{probe}", "--speculative-algorithm", "NGRAM"],
     "--safety-draft-probe needs --speculative-algorithm STANDALONE"),
    (["--safety-draft-probe", "{probe}", "--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path",
      "{model}", "--speculative-eagle-topk", "1"], "--safety-draft-probe ranks the branches of draft trees"),
])
def test_unguarded_or_unenforceable_launches_are_refused(weightless_model, tiny_probe, flags, message):
    flags = [f.format(probe=tiny_probe, model=weightless_model) for f in flags]
    proc = launch(weightless_model, *PLUGIN, "--safety-probe", str(tiny_probe), *flags)
    assert_refused(proc, message)


def test_the_rust_server_ingress_is_refused(weightless_model, tiny_probe):
    proc = launch(weightless_model, *PLUGIN, "--safety-probe", str(tiny_probe), env={"SGLANG_RUST_SERVER": "1"})
    assert_refused(proc, "SGLANG_RUST_SERVER serves requests that bypass the plugin's policy check")
