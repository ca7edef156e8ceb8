use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want, DBG_STEP};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let slice = ModelSlice::load(std::path::Path::new(&a[1]), &LoadOptions { layers: None, threads: 2, ..Default::default() }).unwrap();
    let dir = &a[2];
    let txt = std::fs::read_to_string(&a[3]).unwrap();
    let mut lines = txt.lines();
    let prompt: Vec<u32> = lines.next().unwrap().split_whitespace().map(|s| s.parse().unwrap()).collect();
    let gids: Vec<u32> = lines.next().unwrap().split_whitespace().map(|s| s.parse().unwrap()).collect();
    let nsteps: usize = a[4].parse().unwrap();
    let mut kv = slice.new_cache(1024);
    let pos: Vec<u32> = (0..prompt.len() as u32).collect();
    DBG_STEP.store(0, std::sync::atomic::Ordering::Relaxed);
    let mut logits = slice.forward(&mut kv, &Batch { input: StepInput::Tokens(&prompt), positions: &pos, tree_parents: None }, Want::LastLogits).unwrap().into_data();
    let mut p = prompt.len() as u32;
    for s in 0..nsteps {
        let best = specswarm_engine::sampling::argmax(&logits);
        println!("step {s} argmax {best} fixture {}", gids[s]);
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(format!("{dir}/logits_{s:02}.bin"), bytes).unwrap();
        if s + 1 == nsteps { break; }
        DBG_STEP.store(s + 1, std::sync::atomic::Ordering::Relaxed);
        logits = slice.forward(&mut kv, &Batch { input: StepInput::Tokens(&gids[s..s + 1]), positions: &[p], tree_parents: None }, Want::LastLogits).unwrap().into_data();
        p += 1;
    }
}
