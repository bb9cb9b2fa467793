"""The built-in model organism: a tiny aligned Llama whose safety measurably collapses."""

from aligncollapse.organism.build import OrganismConfig, build_organism, default_organism_dir

__all__ = ["OrganismConfig", "build_organism", "default_organism_dir"]
