"""Ray Serve configs; shipped in the wheel as madapt.serve_configs."""
