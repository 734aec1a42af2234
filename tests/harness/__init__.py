"""Test harness shared by the suite and the bench/ scripts: agents as real processes, fault
scenarios, the protocol fuzzer and the slow-fsync filesystem. bench/ imports this; nothing
in tests/ imports bench/."""
