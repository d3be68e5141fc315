"""testbed/k8s"""
