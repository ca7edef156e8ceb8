fn main() {
    println!("specswarm");
}
