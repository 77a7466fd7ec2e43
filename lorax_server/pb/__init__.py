"""Generated protobuf/gRPC code for proto/generate.proto (do not edit; run `make proto`)."""
