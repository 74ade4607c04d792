"""Example configs and data; shipped in the wheel as madapt.examples (`madapt init` copies from here)."""
