//! Prints the `TenantModel` CustomResourceDefinition as YAML.
fn main() {
    print!("{}", streamscore_crds::crd_yaml());
}
