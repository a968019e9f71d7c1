"""toolkit/core/artifacts"""
