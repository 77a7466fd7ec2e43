"""`python -m lorax_launcher`, same as the `lorax-launcher` console script."""
from lorax_launcher.cli import main

main(prog_name="lorax-launcher")
