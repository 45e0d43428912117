"""The one error type a user sees."""


class SurgeryError(Exception):
    """Bad input or a failed check, with a message that says what failed, where, and how to fix it.

    The CLI prints it as one red line and exits with code 2. Internal invariants use `assert` instead.
    """
