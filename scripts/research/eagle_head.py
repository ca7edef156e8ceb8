"""Research experiment: can a small trained draft head (EAGLE-style) replace the model drafter for
SmolLM2-135M? Not part of the product or the tests.

The head: [embedding of token t+1, target feature f_t] -> fc -> one llama-style decoder layer
(9 heads of 64, RoPE, SwiGLU 1536) -> predicted f_{t+1}; the target's frozen final norm and LM
head read it. Features are the target's final residuals, RMS-normalised. Loss: Huber on the
feature + 0.1 x cross-entropy against the target's distribution over its top-32 tokens; uniform
feature noise +-0.1 during training. Evaluation on the benchmark suites' greedy generations:
top-1/top-4 agreement of the first drafted token, then greedy chains of up to 6 drafted tokens
fed with the head's own features.

Data: cargo run --release -p specswarm-spec --example dump_features -- MODEL DATA/train 400 128
      cargo run --release -p specswarm-spec --example dump_features -- MODEL DATA/eval 0 64 eval
Run:  python3 -m venv V && V/bin/pip install jax optax && DATA=DATA V/bin/python eagle_head.py 1200
"""
import numpy as np, jax, jax.numpy as jnp, optax, os, sys, time
DATA=os.environ.get('DATA','/tmp/eagle')
D=576; V=49152; H=9; HD=64; FF=1536; L=128; K=32
def load(dirn):
    idx=[tuple(map(int,l.split())) for l in open(dirn+'/index.txt')]
    toks=np.fromfile(dirn+'/tokens.u32',dtype=np.uint32).astype(np.int32)
    hid=np.fromfile(dirn+'/hidden.f32',dtype=np.float32).reshape(-1,D); hid=hid/np.sqrt(np.mean(hid*hid,-1,keepdims=True)+1e-6)
    seqs=[];o=0
    for p,n in idx:
        seqs.append((p,toks[o:o+n],hid[o:o+n])); o+=n
    return seqs
head=jnp.asarray(np.fromfile(DATA+'/train/head.f32',dtype=np.float32).reshape(V,D))
emb=jnp.asarray(np.fromfile(DATA+'/train/embed.f32',dtype=np.float32).reshape(V,D))
norm=jnp.asarray(np.fromfile(DATA+'/train/norm.f32',dtype=np.float32))
def rms(x,w): return x*jax.lax.rsqrt(jnp.mean(x*x,-1,keepdims=True)+1e-5)*w
def logits(f): return rms(f,norm)@head.T
def rope(x,pos):
    inv=1.0/(100000.0**(jnp.arange(0,HD,2)/HD))
    ang=pos[:,None]*inv[None,:]
    c,s=jnp.cos(ang),jnp.sin(ang)
    x1,x2=x[...,:HD//2],x[...,HD//2:]
    return jnp.concatenate([x1*c[:,None,:]-x2*s[:,None,:],x1*s[:,None,:]+x2*c[:,None,:]],-1)
def init(key):
    ks=jax.random.split(key,8); n=lambda k,s,sc: jax.random.normal(k,s)*sc
    return dict(fc=n(ks[0],(2*D,D),0.02),wq=n(ks[1],(D,D),0.02),wk=n(ks[2],(D,D),0.02),wv=n(ks[3],(D,D),0.02),
                wo=n(ks[4],(D,D),0.02),wg=n(ks[5],(D,FF),0.02),wu=n(ks[6],(D,FF),0.02),wd=n(ks[7],(FF,D),0.02),
                n1=jnp.ones(D),n2=jnp.ones(D))
def fwd(p,f,tok_next,pos,mask):
    # f: [T,D] features at t, tok_next: [T] token t+1 -> predict f_{t+1}
    x=jnp.concatenate([emb[tok_next],f],-1)@p['fc']
    h=rms(x,p['n1'])
    q=(h@p['wq']).reshape(-1,H,HD); k=(h@p['wk']).reshape(-1,H,HD); v=(h@p['wv']).reshape(-1,H,HD)
    q=rope(q,pos); k=rope(k,pos)
    a=jnp.einsum('thd,shd->hts',q,k)/8.0
    T=f.shape[0]
    causal=jnp.tril(jnp.ones((T,T),bool))
    a=jnp.where(causal[None],a,-1e9)
    a=jax.nn.softmax(a,-1)
    o=jnp.einsum('hts,shd->thd',a,v).reshape(-1,D)@p['wo']
    x=x+o
    h=rms(x,p['n2'])
    x=x+(jax.nn.silu(h@p['wg'])*(h@p['wu']))@p['wd']
    return x
def prep(seqs):
    out=[]
    for p,t,h in seqs:
        n=len(t)
        # inputs t=0..n-2 : f_t, tok_{t+1}; targets f_{t+1}, loss only where t+1 >= p-1 (predicting generated tokens t+2>=p)... keep all, weight gen
        T=min(n-1,L)
        for s in range(0,n-1,L):
            e=min(n-1,s+L); T=e-s
            F=np.zeros((L,D),np.float32);TN=np.zeros(L,np.int32);Y=np.zeros((L,D),np.float32);M=np.zeros(L,np.float32);P=np.zeros(L,np.float32);TT=np.zeros(L,np.int32)
            F[:T]=h[s:e];TN[:T]=t[s+1:e+1];Y[:T]=h[s+1:e+1];M[:T]=1.0;P[:T]=np.arange(s,e)
            # token after t+1 is t+2 (target of logits(f_{t+1})) 
            tt=np.concatenate([t,[0]])[s+2:e+2]; TT[:len(tt)]=tt
            M[:T]*= (np.arange(s,e)+2 < n)  # need t+2 exist
            G=np.zeros(L,np.float32); G[:T]=(np.arange(s,e)+2>=p)
            out.append((F,TN,Y,M,P,G))
    return [np.stack(x) for x in zip(*out)]
def loss_fn(p,F,TN,Y,M,P,C,noise_key):
    F=F+jax.random.uniform(noise_key,F.shape,minval=-0.1,maxval=0.1)  # feature noise (features are rms 1)
    pred=jax.vmap(lambda f,tn,pos: fwd(p,f,tn,pos,None))(F,TN,P)
    reg=jnp.sum(jnp.mean(optax.huber_loss(pred,Y),-1)*M)/jnp.sum(M)
    hc=head[C]*norm  # [B,T,K,D]
    ty=jnp.einsum('btd,btkd->btk',rms(Y,1.0),hc); py=jnp.einsum('btd,btkd->btk',rms(pred,1.0),hc)
    tl=jax.nn.softmax(ty,-1); pl=jax.nn.log_softmax(py,-1)
    ce=-jnp.sum(jnp.sum(tl*pl,-1)*M)/jnp.sum(M)
    return reg+0.1*ce,(reg,ce)
def topk(Y):
    out=[]
    f=jax.jit(lambda y: jax.lax.top_k(logits(y),K)[1])
    for i in range(0,Y.shape[0],16): out.append(np.asarray(f(jnp.asarray(Y[i:i+16]))))
    return np.concatenate(out)
def main():
    tr=load(os.environ.get('TRAIN',DATA+'/train')); ev=load(DATA+'/eval')
    print(len(tr),'train seqs',sum(len(s[1]) for s in tr),'tokens')
    Xtr=prep(tr); Xev=prep(ev); t1=time.time(); Ctr=topk(Xtr[2]); print('topk',time.time()-t1,flush=True)
    p=init(jax.random.PRNGKey(0))
    steps=int(sys.argv[1]) if len(sys.argv)>1 else 2000
    sched=optax.warmup_cosine_decay_schedule(0,3e-4,100,steps)
    opt=optax.chain(optax.clip_by_global_norm(0.5),optax.adamw(sched,weight_decay=0.0))
    st=opt.init(p)
    @jax.jit
    def step(p,st,b,key):
        (l,(r,c)),g=jax.value_and_grad(loss_fn,has_aux=True)(p,*b,key)
        u,st=opt.update(g,st,p); return optax.apply_updates(p,u),st,l,r,c
    @jax.jit
    def evalb(p,F,TN,Y,M,P,G):
        pred=jax.vmap(lambda f,tn,pos: fwd(p,f,tn,pos,None))(F,TN,P)
        a=jnp.argmax(logits(pred),-1); b=jnp.argmax(logits(Y),-1)
        # top-k coverage
        top=jax.lax.top_k(logits(pred),4)[1]
        hit4=jnp.any(top==b[...,None],-1)
        w=M*G
        return jnp.sum((a==b)*w),jnp.sum(hit4*w),jnp.sum(w)
    n=Xtr[0].shape[0]; B=16; rng=np.random.default_rng(0); key=jax.random.PRNGKey(1); t0=time.time()
    for i in range(steps):
        ix=rng.choice(n,B,replace=False); key,k2=jax.random.split(key)
        p,st,l,r,c=step(p,st,[x[ix] for x in Xtr[:5]]+[Ctr[ix]],k2)
        if i%200==0 or i==steps-1:
            s1=s4=sw=0
            for j in range(0,Xev[0].shape[0],8):
                a,b4,w=evalb(p,*[x[j:j+8] for x in Xev]); s1+=a;s4+=b4;sw+=w
            print(f'{i} loss {l:.4f} reg {r:.4f} ce {c:.4f} eval top1 {s1/sw:.3f} top4 {s4/sw:.3f} ({time.time()-t0:.0f}s)',flush=True)
    np.savez(DATA+'/head.npz',**{k:np.asarray(v) for k,v in p.items()})
    chain_eval(p,ev)
def chain_eval(p,ev,depth=6):
    f1=jax.jit(lambda p,F,TN,P: fwd(p,F,TN,P,None))
    lg=jax.jit(lambda y: jnp.argmax(logits(y),-1))
    tot=0;acc=0;n=0;hist=np.zeros(depth+1)
    for pl,t,h in ev:
        T=len(t)
        if T>L: t=t[:L];h=h[:L];T=L
        tgt=np.asarray(lg(jnp.asarray(h)))  # target's next token from f_i : t[i+1] (greedy)
        for s in range(pl-1,T-2):
            # drafting after knowing f_0..f_s and token t[s+1]; predict t[s+2]...
            F=h.copy(); k=0
            for step in range(depth):
                i=s+step
                if i+2>=T: break
                TN=np.zeros(L,np.int32);TN[:T-1]=t[1:T];FF=np.zeros((L,D),np.float32);FF[:T]=F[:T];P=np.arange(L).astype(np.float32)
                out=np.asarray(f1(p,jnp.asarray(FF),jnp.asarray(TN),jnp.asarray(P)))
                fh=out[i]; tok=int(np.asarray(lg(jnp.asarray(fh[None])))[0])
                if tok!=t[i+2]: break
                k+=1; F[i+1]=fh/np.sqrt(np.mean(fh*fh)+1e-6)
            hist[k]+=1; tot+=k; n+=1
    print('chain: mean accepted',tot/n,'hist',hist/n, 'per-token a≈', tot/(tot+n))
main()
