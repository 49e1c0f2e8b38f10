"""megdet_tf.result_line: a child's result survives the rest of its stdout."""
import contextlib
import io

from megdet_tf import result_line


def test_the_last_result_is_read_back_among_other_output():
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    print("progress", end="")  # The result need not start its line.
    result_line.print_result({"step": 1})
    result_line.print_result({"losses": [0.5, 0.25]})
    print("teardown")
  assert result_line.read_result(stdout.getvalue()) == {"losses": [0.5, 0.25]}


def test_no_result_is_none():
  assert result_line.read_result("Traceback (most recent call last):\n") is None
