"""cgroup v2 QEMU guest harness and its tests; see NOTES.md."""
