"""The GPU tests' scripted cases are valid calls, checked on the CPU: a lent GPU's minutes must not go to a case
that fails before any kernel runs (the compute-sanitizer script once asked for an empty output)."""

import lkconv

import test_gpu


def test_sanitizer_script_runs_on_the_torch_backend(monkeypatch):
    script = test_gpu.SANITIZER_SCRIPT.replace('device="cuda"', 'device="cpu"')
    script = script.replace("torch.cuda.synchronize()", "")
    assert script.count('device="cpu"') == 2, "the script's tensors are no longer made where this test expects"
    printed = []
    monkeypatch.setattr("builtins.print", lambda *args: printed.append(args))
    with lkconv.use_backend("torch"):
        exec(compile(script, "sanitized.py", "exec"), {})
    assert printed == [("done",)]
