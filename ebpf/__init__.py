"""cnm.ebpf: the optional BPF data path. This build holds the feature probe only."""
