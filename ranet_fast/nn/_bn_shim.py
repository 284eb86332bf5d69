"""TEMPORARY stand-in for ranet_fast.ops.batch_norm_{stats,relu,relu_backward} (being written on branch bn-ops)."""
import torch


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_norm_stats(x, *, backend=None):
    xa = x.to(_acc(x))
    var, mean = torch.var_mean(xa, dim=(0, 2, 3), correction=0)
    return mean, var


def batch_norm_relu(x, mean, invstd, weight, bias, *, relu=True, out=None, out_offset=0, backend=None):
    acc = _acc(x)
    v = lambda t: t.to(acc).view(1, -1, 1, 1)
    y = (x.to(acc) - v(mean)) * v(invstd) * v(weight) + v(bias)
    if relu:
        y = torch.relu(y)
    if out is None:
        fmt = torch.channels_last if (x.shape[1] > 1 and x.stride(1) == 1) else torch.contiguous_format
        return y.to(x.dtype).contiguous(memory_format=fmt)
    out.narrow(1, out_offset, x.shape[1]).copy_(y)
    return out


def batch_norm_relu_backward(grad_out, x, mean, invstd, weight, bias, *, relu=True, backend=None):
    acc = _acc(x)
    v = lambda t: t.to(acc).view(1, -1, 1, 1)
    xhat = (x.to(acc) - v(mean)) * v(invstd)
    dz = grad_out.to(acc)
    if relu:
        dz = dz * ((xhat * v(weight) + v(bias)) > 0)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    gb = dz.sum((0, 2, 3))
    gw = (dz * xhat).sum((0, 2, 3))
    gx = v(weight) * v(invstd) * (dz - v(gb) / m - xhat * v(gw) / m)
    fmt = torch.channels_last if (x.shape[1] > 1 and x.stride(1) == 1) else torch.contiguous_format
    return gx.to(x.dtype).contiguous(memory_format=fmt), gw, gb
