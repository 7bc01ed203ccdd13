"""python -m fastprox: the demo (``fastprox.demo``)."""

from .demo import main

main()
