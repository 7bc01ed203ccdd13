"""The layouts the kernel tests run every operator on; bench/compile_gate.py compiles what they
launch."""

# (shape, dim): rows, columns, conv filters / input channels / positions, 3-D and 4-D groups
LAYOUTS = [
    ((7, 37), 1),
    ((37, 7), 0),
    ((6, 5, 3, 3), (1, 2, 3)),
    ((6, 5, 3, 3), (0, 2, 3)),
    ((6, 5, 3, 3), 0),
    ((4, 5, 6), (0, 2)),
    ((3, 4, 5, 6), (1, 3)),   # K R K R in logical order: through the kept-first copy
    ((5, 70), 0),
    ((1, 1), 1),
    ((9,), 0),
]
