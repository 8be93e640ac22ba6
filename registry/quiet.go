package registry

import (
	"io"
	"sync"

	"github.com/sirupsen/logrus"
)

var quietOnce sync.Once

// quietDistributionLogs silences logrus' standard logger, once per process.
//
// This is the one piece of global state the package touches, because there is
// no per-app alternative in distribution v3.1.2: its loggers come from
// internal/dcontext, which falls back to logrus.StandardLogger() unless the
// context carries a logger under an unexported key of an internal package;
// configuration.Log is applied only by registry.NewRegistry (which also
// installs OTEL exporters and signal handlers); and the token verifier logs
// through the logrus package functions directly. Without this every request
// writes an "response completed" line to stderr, and formatting those lines
// costs throughput that benchmarks would attribute to the registry.
//
// Level Error keeps Info/Debug calls from formatting at all; output io.Discard
// drops the rest.
func quietDistributionLogs() {
	quietOnce.Do(func() {
		logrus.SetLevel(logrus.ErrorLevel)
		logrus.SetOutput(io.Discard)
	})
}
