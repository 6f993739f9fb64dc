def main():
    import anyverse.generators, anyverse.prompts
    from importlib import resources
    print(anyverse.generators.__file__, list(resources.files("anyverse.prompts").iterdir()))
