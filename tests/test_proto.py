"""The committed generated gRPC code matches proto/generate.proto (regenerate with `make proto`)."""
from lorax_server.pb.regenerate import stale_files


def test_generated_code_is_fresh():
    assert stale_files() == [], "run `make proto` and commit the result"
