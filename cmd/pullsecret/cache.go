package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/secret"
)

func cacheCommand() *command {
	return &command{
		summary: "Inspect, trim and warm the proxy's content cache",
		sub: map[string]*command{
			"gc":    {summary: "Delete least recently used cache entries", usage: cacheGCUsage, run: (*cli).cacheGC},
			"stats": {summary: "Count the cache's blobs, manifests and tags", usage: cacheStatsUsage, run: (*cli).cacheStats},
			"warm":  {summary: "Pre-fetch images into the cache through the proxy", usage: cacheWarmUsage, run: (*cli).cacheWarm},
		},
	}
}

const cacheGCUsage = `Usage: pullsecret cache gc [--max-size SIZE] [--older-than DURATION]

Delete cache entries, least recently used first, until the cache holds at
most SIZE bytes of blobs and manifests, and every entry not used for
DURATION. A blob that a still-cached manifest references stays (images are
kept whole), and so does anything a running server is reading. Deleting is
crash-safe: an entry leaves its final path before it is deleted.

Safe to run while 'pullsecret serve' runs on the same cache. With --config
it works on the cache the server's config names (cache.driver: an S3
bucket, say), using the last use that every replica records there.

Flags:
  --max-size SIZE          e.g. 20GiB, 500MB, 1073741824 (0: delete every entry it may)
  --older-than DURATION    e.g. 72h, 30d, 90m
  --config FILE            the server's config (default: $PULLSECRET_CONFIG): its cache
  --dir DIR                cache folder (default: cache in the data folder)
  --home DIR               data folder (default: $PULLSECRET_HOME)
  -o, --output FORMAT      text (default) or json
`

const cacheStatsUsage = `Usage: pullsecret cache stats

Print the number and size of cached blobs and manifests, and the number of
cached tags.

Flags:
  --config FILE            the server's config (default: $PULLSECRET_CONFIG): its cache
                           (cache.driver, cache.root, cache.parameters)
  --dir DIR                cache folder (default: cache in the data folder)
  --home DIR               data folder (default: $PULLSECRET_HOME)
  -o, --output FORMAT      text (default) or json
`

type cacheFlags struct {
	dir, home, config string
}

func (c *cli) cacheFlagSet(name string) (*flag.FlagSet, *cacheFlags, *string) {
	fs := newFlagSet(name)
	cf := &cacheFlags{}
	fs.StringVar(&cf.dir, "dir", "", "")
	fs.StringVar(&cf.config, "config", "", "")
	fs.StringVar(&cf.home, "home", "", "")
	return fs, cf, outputFlag(fs, "text")
}

// cacheHome is the data folder of a config's cache spool: the global
// --home, else the config's home, else the environment's.
func (c *cli) cacheHome(cfg proxy.Config) (string, error) {
	if c.home != "" {
		return c.home, nil
	}
	if cfg.Home != "" {
		return cfg.Home, nil
	}
	return secret.HomeFromEnv(c.getenv)
}

// cacheDir is --dir, else <data folder>/cache: where 'pullsecret serve'
// keeps its cache by default.
func (c *cli) cacheDir(cf *cacheFlags) (string, error) {
	if cf.dir != "" {
		return cf.dir, nil
	}
	home := cf.home
	if home == "" {
		home = c.home
	}
	if home == "" {
		h, err := secret.HomeFromEnv(c.getenv)
		if err != nil {
			return "", err
		}
		home = h
	}
	return filepath.Join(home, "cache"), nil
}

// openCache opens the cache, or returns nil when there is none yet. The
// string names it: a folder, or a storage driver and its bucket.
func (c *cli) openCache(cf *cacheFlags, usage string) (*cache.Cache, string, error) {
	cfg, ok, err := c.commandConfig(&common{config: cf.config})
	if err != nil {
		return nil, "", err
	}
	if ok && cf.dir != "" {
		if cf.config == "" {
			ok = false // an explicit --dir wins over $PULLSECRET_CONFIG
		} else {
			return nil, "", &usageError{msg: "give --dir or --config, not both", usage: usage}
		}
	}
	if ok {
		d, err := cfg.Cache.ResolveDriver(c.getenv)
		if err != nil {
			return nil, "", err
		}
		if d.Name != proxy.CacheDriverFilesystem {
			home := cf.home
			if home == "" {
				if home, err = c.cacheHome(cfg); err != nil {
					return nil, "", err
				}
			}
			cc, err := openCacheStore(c.ctx, cfg.Cache, home, slog.New(slog.DiscardHandler))
			return cc, d.Describe(), err
		}
		if root, _ := d.Parameters["rootdirectory"].(string); root != "" {
			cf.dir = root
		} else if cfg.Cache.Root != "" {
			cf.dir = cfg.Cache.Root
		} else if cf.home == "" && c.home == "" && cfg.Home != "" {
			cf.home = cfg.Home
		}
	}
	dir, err := c.cacheDir(cf)
	if err != nil {
		return nil, "", err
	}
	if st, err := os.Stat(dir); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, dir, nil
		}
		return nil, dir, err
	} else if !st.IsDir() {
		return nil, dir, fmt.Errorf("%s is not a folder", dir)
	}
	cc, err := cache.OpenFilesystem(c.ctx, dir)
	if err != nil {
		return nil, dir, err
	}
	return cc, dir, nil
}

func (c *cli) cacheStats(args []string) error {
	fs, cf, out := c.cacheFlagSet("stats")
	pos, err := c.parseFlags(fs, args, cacheStatsUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, cacheStatsUsage); err != nil {
		return err
	}
	if err := checkOutput(*out, cacheStatsUsage, "text", "json"); err != nil {
		return err
	}
	cc, dir, err := c.openCache(cf, cacheStatsUsage)
	if err != nil {
		return err
	}
	var s cache.Stats
	if cc != nil {
		defer cc.Close()
		if s, err = cc.Stats(c.ctx); err != nil {
			return fmt.Errorf("cache stats: %w", err)
		}
	}
	if *out == "json" {
		return json.NewEncoder(c.stdout).Encode(map[string]any{
			"dir":       dir,
			"blobs":     map[string]int64{"count": int64(s.Blobs.Count), "bytes": s.Blobs.Bytes},
			"manifests": map[string]int64{"count": int64(s.Manifests.Count), "bytes": s.Manifests.Bytes},
			"total":     map[string]int64{"count": int64(s.Count()), "bytes": s.Bytes()},
			"tags":      s.Tags,
		})
	}
	fmt.Fprintf(c.stdout, "cache      %s\n", dir)
	fmt.Fprintf(c.stdout, "blobs      %6d  %s\n", s.Blobs.Count, humanBytes(s.Blobs.Bytes))
	fmt.Fprintf(c.stdout, "manifests  %6d  %s\n", s.Manifests.Count, humanBytes(s.Manifests.Bytes))
	fmt.Fprintf(c.stdout, "total      %6d  %s\n", s.Count(), humanBytes(s.Bytes()))
	fmt.Fprintf(c.stdout, "tags       %6d\n", s.Tags)
	return nil
}

func (c *cli) cacheGC(args []string) error {
	fs, cf, out := c.cacheFlagSet("gc")
	maxSize := fs.String("max-size", "", "")
	olderThan := fs.String("older-than", "", "")
	pos, err := c.parseFlags(fs, args, cacheGCUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, cacheGCUsage); err != nil {
		return err
	}
	if err := checkOutput(*out, cacheGCUsage, "text", "json"); err != nil {
		return err
	}
	if *maxSize == "" && *olderThan == "" {
		return &usageError{msg: "give --max-size, --older-than or both", usage: cacheGCUsage}
	}
	var p cache.Policy
	if *maxSize != "" {
		n, err := parseSize(*maxSize)
		if err != nil {
			return &usageError{msg: "--max-size: " + err.Error(), usage: cacheGCUsage}
		}
		// A zero Policy field means "no limit"; an explicit 0 here means
		// "keep nothing the policy may delete".
		p.MaxSize = max(n, 1)
	}
	if *olderThan != "" {
		d, err := parseAge(*olderThan)
		if err != nil {
			return &usageError{msg: "--older-than: " + err.Error(), usage: cacheGCUsage}
		}
		p.OlderThan = max(d, time.Nanosecond)
	}
	cc, dir, err := c.openCache(cf, cacheGCUsage)
	if err != nil {
		return err
	}
	var res cache.GCResult
	if cc != nil {
		defer cc.Close()
		if res, err = cc.GC(c.ctx, p); err != nil {
			return fmt.Errorf("cache gc: %w", err)
		}
	}
	if *out == "json" {
		return json.NewEncoder(c.stdout).Encode(map[string]any{
			"dir":                dir,
			"deleted":            res.Deleted,
			"deleted_bytes":      res.DeletedBytes,
			"kept":               res.Kept,
			"kept_bytes":         res.KeptBytes,
			"skipped_in_use":     res.SkippedInUse,
			"skipped_referenced": res.SkippedReferenced,
			"tags_deleted":       res.TagsDeleted,
		})
	}
	entries := "entries"
	if res.Deleted == 1 {
		entries = "entry"
	}
	fmt.Fprintf(c.stdout, "deleted %d %s (%s), kept %d (%s)", res.Deleted, entries, humanBytes(res.DeletedBytes), res.Kept, humanBytes(res.KeptBytes))
	if res.SkippedReferenced+res.SkippedInUse > 0 {
		fmt.Fprintf(c.stdout, "; kept %d referenced by cached manifests and %d in use", res.SkippedReferenced, res.SkippedInUse)
	}
	fmt.Fprintln(c.stdout)
	return nil
}

// parseSize reads 1073741824, 512KB, 20GiB, 1.5G (K/M/G/T are powers of
// 1000 with B, of 1024 with iB or alone).
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	num, unit := t, ""
	if i >= 0 {
		num, unit = t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 || num == "" {
		return 0, fmt.Errorf("invalid size %q", printable(s))
	}
	mult := map[string]float64{
		"": 1, "b": 1,
		"k": 1 << 10, "kib": 1 << 10, "kb": 1e3,
		"m": 1 << 20, "mib": 1 << 20, "mb": 1e6,
		"g": 1 << 30, "gib": 1 << 30, "gb": 1e9,
		"t": 1 << 40, "tib": 1 << 40, "tb": 1e12,
	}[unit]
	if mult == 0 {
		return 0, fmt.Errorf("invalid size %q (units: B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)", printable(s))
	}
	v := f * mult
	if v > math.MaxInt64/2 {
		return 0, fmt.Errorf("size %q is too large", printable(s))
	}
	return int64(v), nil
}

// parseAge reads a Go duration, or whole days ("30d").
func parseAge(s string) (time.Duration, error) {
	if n, ok := strings.CutSuffix(s, "d"); ok {
		days, err := strconv.Atoi(n)
		if err != nil || days < 0 || days > 100000 {
			return 0, fmt.Errorf("invalid duration %q", printable(s))
		}
		return time.Duration(days) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("invalid duration %q (e.g. 72h, 30d)", printable(s))
	}
	return d, nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
