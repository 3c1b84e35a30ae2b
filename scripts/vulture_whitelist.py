"""Names vulture reports as unused that are used where it cannot see (scripts/lint)."""
# argparse calls Action.__call__(parser, namespace, values, option_string): its signature
namespace
option_string
