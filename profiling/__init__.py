"""Profiling helpers of igds_fast (import name `igds_fast.profiling`)."""
