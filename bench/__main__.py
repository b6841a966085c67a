"""``python -m bench`` is ``make bench``: see :mod:`bench.run`."""
from bench.run import get_args_parser, main

main(get_args_parser().parse_args())
