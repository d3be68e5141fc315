"""testbed/experiment"""
