"""The gRPC edge: server assembly, the KeyService adapter and the error-to-status table."""
