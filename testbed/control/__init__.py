"""testbed/control"""
