"""A server script written for datatrove: argparse flags with underscores (``--max_batch_size``),
and no other flags taken (an unknown one ends it, as argparse does)."""

import argparse

import _common

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--max_batch_size", type=int, required=True)
args = parser.parse_args()
_common.serve(args.port)
_common.say(_common.READY_LINE)
_common.wait_forever()
