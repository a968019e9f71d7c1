"""toolkit/plan"""
