// `sqlx::migrate!` embeds migrations/ at compile time; without this, a migration added on its
// own would not rebuild the crate and the binary would silently lack it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
