"""testbed/emulation"""
