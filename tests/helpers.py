"""Shared test helpers: the STYLE.md error rule and random inputs."""
import torch


def assert_close_2x(out, ref64, ref_same_dtype, name="", floor=1e-6):
    """STYLE.md rule: |out - ref64| may be at most 2x |torch same-dtype - ref64| plus a small floor."""
    out = out.detach().double()
    ref64 = ref64.detach().double()
    base = (ref_same_dtype.detach().double() - ref64).abs().max().item()
    err = (out - ref64).abs().max().item()
    scale = max(ref64.abs().max().item(), 1.0)
    tol = 2 * base + floor * scale
    assert err <= tol, f"{name}: max error {err:.3e} > 2 x torch error {base:.3e} + floor ({tol:.3e})"


def zipf_ids(batch, field_dims, a=1.2, generator=None, dtype=torch.int64):
    """Zipf-skewed field-local ids: a few hot ids per field, many duplicates."""
    cols = []
    for size in field_dims:
        ranks = torch.arange(1, size + 1, dtype=torch.float64)
        probs = ranks ** (-a)
        cols.append(torch.multinomial(probs / probs.sum(), batch, replacement=True, generator=generator))
    return torch.stack(cols, dim=1).to(dtype)


def offsets_of(field_dims):
    out = [0]
    for size in field_dims[:-1]:
        out.append(out[-1] + size)
    return torch.tensor(out, dtype=torch.int64)
