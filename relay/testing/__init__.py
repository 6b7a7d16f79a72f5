"""Honest fakes shipped as real code (as httpcore ships its mock backend): tests and benchmarks
use them in place of the real parts they stand for, and each passes the same contract suite."""
