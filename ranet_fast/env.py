"""Report the software stack and which ranet_fast backends can run here.

    python -m ranet_fast.env            human-readable report
    python -m ranet_fast.env --json     the same as JSON (for benchmark records)
"""

from __future__ import annotations

import argparse
import json
import platform

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ranet_fast.env", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = environment_info()
    print(json.dumps(info, indent=2) if args.json else format_report(info))


if __name__ == "__main__":
    main()
