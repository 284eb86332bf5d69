"""Report the software stack and which ranet_fast backends can run here.

    python -m ranet_fast.env            human-readable report
    python -m ranet_fast.env --json     the same as JSON (for benchmark records)
    python -m ranet_fast.env --require cuda-build,triton
                                        exit 1, saying what is missing, unless every named
                                        requirement holds (CI runs this where nvcc exists)

Requirements: ``extension`` (ranet_fast._C imports), ``cuda-build`` (and was
compiled with its CUDA kernels), ``triton`` (Triton imports). A GPU is not
needed for any of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from . import _extension

_BACKEND_LABELS = {
    "cuda": "cuda (compiled CUDA kernels)",
    "triton": "triton",
    "cpu": "cpu extension",
    "reference": "reference (PyTorch)",
}


def _triton_version() -> str | None:
    if _extension.triton_import_error() is not None:
        return None
    import triton

    return triton.__version__


def _backend_report(backend: str) -> dict:
    """Availability of ``backend`` for the tensors it is meant for."""
    if backend == "cuda":
        devices = ["cuda"]
    elif backend == "triton":
        devices = ["cuda", "cpu"]
    else:
        devices = ["cpu"]
    reasons = {}
    for device in devices:
        available, reason = _extension.backend_status(backend, device)
        if available:
            return {"available": True, "device": device, "reason": reason}
        reasons[device] = reason
    if len(set(reasons.values())) == 1:
        # One cause for every device (e.g. "triton not installed"): say it once.
        summary = next(iter(reasons.values()))
    else:
        summary = "; ".join(f"{device}: {reason}" for device, reason in reasons.items())
    return {"available": False, "device": None, "reason": summary}


def environment_info() -> dict:
    """Versions, devices and backend availability as a JSON-serialisable dict."""
    cuda_available = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "cuda_available": cuda_available,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda_available
        else [],
        "extension": {
            "loaded": _extension.extension_loaded(),
            "with_cuda": _extension.extension_built_with_cuda(),
            "built_with_torch": _extension.extension_torch_version(),
            "import_error": _extension.extension_import_error(),
        },
        "triton_interpret": _extension.triton_interpret_requested(),
        "backends": {backend: _backend_report(backend) for backend in _extension.BACKENDS},
    }


def _extension_summary(extension: dict) -> str:
    if not extension["loaded"]:
        return f"not loaded ({extension['import_error']})"
    return "loaded, " + ("with CUDA kernels" if extension["with_cuda"] else "CPU kernels only")


def format_report(info: dict) -> str:
    lines = [
        f"python        {info['python']} ({info['platform']})",
        f"torch         {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        f"triton        {info['triton'] or 'not installed'}",
        f"GPUs          {', '.join(info['gpus']) if info['gpus'] else 'none visible'}",
        f"ranet_fast._C {_extension_summary(info['extension'])}",
        f"TRITON_INTERPRET=1: {'yes' if info['triton_interpret'] else 'no'}",
        "backends:",
    ]
    width = max(len(label) for label in _BACKEND_LABELS.values())
    for backend, report in info["backends"].items():
        answer = "yes" if report["available"] else "no "
        lines.append(f"  {_BACKEND_LABELS[backend]:<{width}}  {answer}  {report['reason']}")
    return "\n".join(lines)


_REBUILD = (f"rebuild from the repository root with `{_extension.REBUILD_COMMAND}` "
            "(or `./run.sh setup`)")


def _extension_problem() -> str | None:
    if _extension.extension_loaded():
        return None
    if _extension._env_flag(_extension.NO_EXTENSION_ENV_VAR):
        return f"ranet_fast._C is not loaded: {_extension.NO_EXTENSION_ENV_VAR}=1 is set; unset it"
    return (f"ranet_fast._C is not loaded ({_extension.extension_import_error()}); the package was "
            f"installed without its compiled extension: {_REBUILD}")


def _cuda_build_problem() -> str | None:
    problem = _extension_problem()
    if problem is not None or _extension.extension_built_with_cuda():
        return problem
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        why = ("setup.py found no CUDA toolkit (set CUDA_HOME to the toolkit root holding "
               "include/cuda_runtime.h and bin/nvcc), or RANET_FAST_WITH_CUDA=0 was set")
    return f"ranet_fast._C was built without its CUDA kernels: {why}; then {_REBUILD}"


def _triton_problem() -> str | None:
    error = _extension.triton_import_error()
    if error is None:
        return None
    return f"Triton is unusable ({error}): install it in this environment, e.g. `pip install triton`"


REQUIREMENTS = {"extension": _extension_problem, "cuda-build": _cuda_build_problem, "triton": _triton_problem}


def unmet_requirements(names: list[str]) -> list[str]:
    """One message per requirement in ``names`` that does not hold here."""
    unknown = [name for name in names if name not in REQUIREMENTS]
    if unknown:
        raise ValueError(f"unknown requirement(s) {', '.join(unknown)}; choose from {', '.join(REQUIREMENTS)}")
    return [f"{name}: {problem}" for name in names if (problem := REQUIREMENTS[name]()) is not None]


def _requirement_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in REQUIREMENTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(REQUIREMENTS)}; got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ranet_fast.env", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--require", type=_requirement_list, metavar="LIST",
                        help=f"exit 1 unless all of these hold: {', '.join(REQUIREMENTS)} (comma-separated); "
                             "prints only the verdict")
    args = parser.parse_args(argv)
    if args.require is not None:
        problems = unmet_requirements(args.require)
        if problems:
            print(f"ranet_fast.env: {len(problems)} required backend(s) missing:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return 1
        print(f"ranet_fast.env: required backends present: {', '.join(args.require)}")
        return 0
    info = environment_info()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
