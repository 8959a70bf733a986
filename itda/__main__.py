"""`python -m itda ...` (and `torchrun -m itda build ...`): the itda command line."""

from itda.cli.main import app

app(prog_name="itda")
