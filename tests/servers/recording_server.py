"""Records its argv, pid, port and $INFERMILL_TEST_MARK, then serves and prints the ready line."""

import _common

args = _common.parse(_common.parser(__doc__))
_common.record(args)
_common.serve(args.port)
_common.say(_common.READY_LINE)
_common.wait_forever()
