"""Does this torch's inductor searchsorted honour a sliced boundary tensor? (pytorch#182343)

``Boundaries.from_cu_seqlens`` numbers tokens by searchsorted; on torch 2.11's Triton lowering,
``searchsorted(cu[1:], ...)`` read ``cu`` from its start, so every token was numbered one
sequence on. Prints compiled vs eager for the old form and for the one the engine uses now.
Run on a GPU: ``python scripts/probe_searchsorted_slice.py``.
"""

import torch


def old_form(cu: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(cu[1:], flat, right=True)


def engine_form(cu: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(cu, flat, right=True) - 1


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cu = torch.tensor([0, 5, 14, 17, 28], dtype=torch.int32, device=device)
    flat = torch.arange(28, dtype=torch.int32, device=device)
    for name, fn in [
        ("searchsorted(cu[1:], t, right=True)", old_form),
        ("searchsorted(cu, t, right=True) - 1", engine_form),
    ]:
        eager, compiled = fn(cu, flat), torch.compile(fn, backend="inductor")(cu, flat)
        print(
            f"{name}: torch {torch.__version__} {device}, compiled == eager: {torch.equal(eager, compiled)} "
            f"(eager {eager.tolist()[:8]}..., compiled {compiled.tolist()[:8]}...)"
        )


if __name__ == "__main__":
    main()
