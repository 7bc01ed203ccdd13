"""python -m fastprox: the demo (``fastprox.demo``); ``python -m fastprox.timing`` times the
operators on one large weight."""

from .demo import main

main()
