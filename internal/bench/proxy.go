package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/secret"
)

// Sizes and counts of the proxy benchmark.
const (
	proxyBlobSize      = 256 << 20
	proxyBlobRounds    = 5
	proxyManifestCount = 200
)

// proxyBench compares, in one run and interleaved, fetching from an
// in-process upstream (distribution v3, filesystem driver, htpasswd)
// directly and through the proxy (in-process, built as `pullsecret serve`
// builds it, with verify_blobs on and off): throughput of a 256 MiB blob and
// manifest GET latency. Both sides authenticate with Basic (the upstream
// credential directly, the project pull token through the proxy).
func (b *bench) proxyBench(ctx context.Context) error {
	tmp, err := os.MkdirTemp("", "pullsecret-bench-proxy-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	const user, pass = "bench", "bench-upstream-pw"
	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{user: pass}),
		registry.WithFilesystem(filepath.Join(tmp, "upstream")))
	if err != nil {
		return fmt.Errorf("start the upstream: %w", err)
	}
	defer up.Close()
	blob, err := up.SeedBlob(ctx, "bench/app", proxyBlobSize, registry.RandSeed(1))
	if err != nil {
		return fmt.Errorf("seed blob: %w", err)
	}
	if _, err := up.SeedRandom(ctx, "bench/app", "v1", registry.Layers(2), registry.LayerSize(64<<10)); err != nil {
		return fmt.Errorf("seed image: %w", err)
	}

	home := filepath.Join(tmp, "home")
	store, err := secret.Open(home)
	if err != nil {
		return err
	}
	pat, err := secret.ParsePattern(up.Host())
	if err != nil {
		return err
	}
	if _, err := store.Create(ctx, secret.Secret{Project: "bench", Name: "upstream", Kind: secret.Basic, Registries: []secret.Pattern{pat}},
		secret.Value{Username: user, Password: pass}); err != nil {
		return err
	}
	tokens, err := proxy.NewTokenStore(home)
	if err != nil {
		return err
	}
	tok, _, err := tokens.Create(ctx, proxy.TokenSpec{Project: "bench", Name: "bench", Scopes: []string{proxy.ScopePull}, TTL: time.Hour})
	if err != nil {
		return err
	}
	signer, err := proxy.LoadSigner(home)
	if err != nil {
		return err
	}

	// One proxy per verify_blobs setting, both in front of the same upstream.
	urls := map[string]string{"direct": up.URL() + "/v2"}
	for _, verify := range []bool{true, false} {
		cfg := proxy.DefaultConfig()
		cfg.Home = home
		cfg.Listen = "127.0.0.1:0"
		cfg.Aliases = map[string]string{"up": up.Host()}
		cfg.VerifyBlobs = verify
		if err := cfg.AllowPrivateUpstreams.Set([]string{"127.0.0.1/32"}); err != nil {
			return err
		}
		if err := cfg.Validate(); err != nil {
			return err
		}
		// Request logs at the default level, written nowhere: their cost
		// counts, the terminal's does not.
		log := proxy.NewLogger(io.Discard, cfg.Log)
		auth := proxy.NewAuth(tokens, signer,
			proxy.WithTokenTTL(cfg.TokenTTL),
			proxy.WithRepositoryFilter(proxy.AllowlistFilter(cfg, store)),
			proxy.WithAuthLogger(log))
		srv, err := proxy.New(cfg, store, auth, proxy.WithLogger(log), proxy.WithHandler("/token", auth.TokenHandler()))
		if err != nil {
			return err
		}
		defer srv.Close()
		ln, err := srv.Listen()
		if err != nil {
			return err
		}
		sctx, cancel := context.WithCancel(ctx)
		defer cancel()
		go srv.Serve(sctx, ln)
		urls[fmt.Sprintf("proxy(verify=%v)", verify)] = "http://" + ln.Addr().String() + "/v2/up"
	}
	names := []string{"direct", "proxy(verify=true)", "proxy(verify=false)"}

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4, DisableCompression: true}}
	get := func(name, path string) (int64, time.Duration, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, urls[name]+path, nil)
		if err != nil {
			return 0, 0, err
		}
		req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json")
		if name == "direct" {
			req.SetBasicAuth(user, pass)
		} else {
			req.SetBasicAuth("bench", tok)
		}
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			return 0, 0, fmt.Errorf("%s GET %s: %w", name, path, err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		d := time.Since(start)
		if err != nil {
			return n, d, fmt.Errorf("%s GET %s: %w", name, path, err)
		}
		if resp.StatusCode != http.StatusOK {
			return n, d, fmt.Errorf("%s GET %s: status %d", name, path, resp.StatusCode)
		}
		return n, d, nil
	}

	blobPath := "/bench/app/blobs/" + blob.String()
	manifestPath := "/bench/app/manifests/v1"
	// Warm up: connections, upstream tokens, the page cache.
	for _, n := range names {
		if _, _, err := get(n, manifestPath); err != nil {
			return err
		}
		if size, _, err := get(n, blobPath); err != nil || size != proxyBlobSize {
			return fmt.Errorf("warm-up blob via %s: %d bytes, %v", n, size, err)
		}
	}

	tput := map[string][]float64{} // MiB/s
	cpu := map[string][]float64{}  // CPU seconds (all threads) per GiB
	for round := range proxyBlobRounds {
		for i := range names {
			n := names[(i+round)%len(names)] // rotate who goes first
			before := cpuTime()
			size, d, err := get(n, blobPath)
			if err != nil {
				return err
			}
			tput[n] = append(tput[n], float64(size)/(1<<20)/d.Seconds())
			cpu[n] = append(cpu[n], (cpuTime()-before).Seconds()/(float64(size)/(1<<30)))
		}
	}
	lat := map[string][]time.Duration{}
	for i := range proxyManifestCount {
		for j := range names {
			n := names[(i+j)%len(names)]
			_, d, err := get(n, manifestPath)
			if err != nil {
				return err
			}
			lat[n] = append(lat[n], d)
		}
	}

	fmt.Printf("upstream: distribution v3, filesystem driver, htpasswd; proxy in-process; Basic auth both sides\n")
	fmt.Printf("blob: %d MiB x %d rounds each, interleaved (median); manifest: %d GETs each, interleaved\n",
		proxyBlobSize>>20, proxyBlobRounds, proxyManifestCount)
	dT := median(tput["direct"])
	d50, d95 := pct(lat["direct"], 50), pct(lat["direct"], 95)
	for _, n := range names {
		t := median(tput[n])
		p50, p95 := pct(lat[n], 50), pct(lat[n], 95)
		fmt.Printf("%-20s blob %8.0f MiB/s (min %6.0f, max %6.0f)  CPU %5.2f s/GiB   manifest p50 %8s  p95 %8s\n",
			n, t, slices.Min(tput[n]), slices.Max(tput[n]), median(cpu[n]), ms(p50), ms(p95))
	}
	for _, n := range names[1:] {
		t := median(tput[n])
		p50 := pct(lat[n], 50)
		fmt.Printf("%-20s throughput %5.2fx direct (target >= 0.90x)   manifest p50 overhead %8s (target <= 2ms)  p95 overhead %8s\n",
			n, t/dT, ms(p50-d50), ms(pct(lat[n], 95)-d95))
	}
	// Client, upstream and proxy share this process and its cores: the
	// CPU figures say what the proxy adds per GiB, whatever the core count.
	dC := median(cpu["direct"])
	for _, n := range names[1:] {
		fmt.Printf("%-20s CPU per GiB %5.2fx direct (client+upstream %.2f s/GiB, proxy adds %.2f s/GiB)\n",
			n, median(cpu[n])/dC, dC, median(cpu[n])-dC)
	}
	return nil
}

// cpuTime is the CPU time this process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
