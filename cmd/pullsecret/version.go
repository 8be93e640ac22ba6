package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func versionCommand() *command {
	return &command{summary: "Print the version", usage: versionUsage, run: (*cli).version}
}

const versionUsage = `Usage: pullsecret version

Print the version of pullsecret, and the Go version and platform it was
built with.
`

func (c *cli) version(args []string) error {
	fs := newFlagSet("version")
	pos, err := c.parseFlags(fs, args, versionUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, versionUsage); err != nil {
		return err
	}
	return printVersion(c)
}

func printVersion(c *cli) error {
	_, err := fmt.Fprintf(c.stdout, "pullsecret %s (%s %s/%s)\n", versionString(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return err
}

// versionString is the -X version, or for a plain go build the VCS
// revision the build recorded.
func versionString() string {
	if version != "dev" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return version
	}
	rev, dirty := "", false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return version
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if dirty {
		rev += "-dirty"
	}
	return version + "+" + rev
}
